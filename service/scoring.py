"""From a patient's timeline to scored tasks and a forecast: tokenize with the artifact's
frozen vocabulary and lab bins, keep the model's window, find the length-of-stay cut, and
let the engine score everything in one pass (DESIGN.md 4.1)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fhir_adapter.timeline import Timeline, VisitClass
from fhir_adapter.tokenizer import TokenSequence, tokenize
from model.artifact import Artifact
from model.engine import Engine, ForecastStep, PatientInput
from model.tasks import Task

LOS_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class DataFacts:
    """What the score was computed from, for the caller to judge it."""

    resources: dict[str, int]
    dropped: dict[str, int]
    visits: int
    events: int
    tokens: int
    truncated: bool
    last_updated: datetime | None


@dataclass(frozen=True)
class Scored:
    probabilities: dict[Task, float]
    not_scored: dict[Task, str]
    forecast: tuple[ForecastStep, ...]
    facts: DataFacts
    timings: dict[str, float] = field(default_factory=dict)


class Scorer:
    """Scores timelines with one loaded artifact. Thread-safe for concurrent ``score``
    calls (the engine runs under ``torch.no_grad`` and keeps no per-call state)."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.engine = Engine(artifact.model, artifact.vocab)

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The tasks this model was trained for and serves."""
        return self.artifact.config.tasks

    def score(
        self, timeline: Timeline, tasks: Sequence[Task], forecast: int, now: datetime
    ) -> Scored:
        started = time.perf_counter()
        sequence = tokenize(
            timeline, self.artifact.vocab, self.artifact.bins, until=now,
            max_length=self.artifact.config.max_length,
        )  # fmt: skip
        tokenized = time.perf_counter()
        not_scored: dict[Task, str] = {}
        los_cut = None
        if Task.LENGTH_OF_STAY in tasks:
            los_cut = _los_cut(timeline, sequence, now)
            if los_cut is None:
                not_scored[Task.LENGTH_OF_STAY] = "no current inpatient stay to ask about"
        if len(sequence) <= 1:
            raise ValueError("the record holds nothing to score")
        result = self.engine.score([PatientInput(sequence, los_cut=los_cut)], tasks,
                                   forecast=forecast)[0]  # fmt: skip
        scored = time.perf_counter()
        facts = DataFacts(
            resources=dict(timeline.source.resource_counts),
            dropped=dict(timeline.source.dropped),
            visits=len(timeline.visits),
            events=len(timeline.events),
            tokens=len(sequence),
            truncated=sequence.truncated,
            last_updated=timeline.source.last_updated,
        )
        return Scored(
            probabilities=result.probabilities,
            not_scored=not_scored,
            forecast=result.forecast,
            facts=facts,
            timings={"tokenize_s": tokenized - started, "score_s": scored - tokenized},
        )


def _los_cut(timeline: Timeline, sequence: TokenSequence, now: datetime) -> int | None:
    """The prefix length at the current inpatient stay's start + 24 h (or now, if that is
    earlier); None when the latest visit is not an ongoing inpatient stay."""
    if not timeline.visits:
        return None
    current = timeline.visits[-1]
    if current.visit_class is not VisitClass.INPATIENT or current.end is not None:
        return None
    cut = sequence.cut(min(current.start + LOS_WINDOW, now))
    return cut if cut > 0 else None
