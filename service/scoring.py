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
from model.engine import CachedScan, Engine, ForecastStep, PatientInput
from model.explain import Explainer
from model.onnx_step import OnnxStep
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
class Prepared:
    """One request made ready for the engine: the tokens (and a cached scan they extend, if
    any), what was asked, and what cannot be answered."""

    input: PatientInput
    tasks: tuple[Task, ...]
    forecast: int
    not_scored: dict[Task, str]
    facts: DataFacts


@dataclass(frozen=True)
class Scored:
    """An engine answer for one request; ``input`` is exactly what was scored (the
    explanations of ``service.explaining`` explain that input)."""

    input: PatientInput
    probabilities: dict[Task, float]
    not_scored: dict[Task, str]
    forecast: tuple[ForecastStep, ...]
    facts: DataFacts
    cache: CachedScan
    scanned_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class Scorer:
    """Scores timelines with one loaded artifact.

    ``prepare`` (tokenize, find cut points) runs per request; ``run`` scores any number of
    prepared requests in one engine call, which is what the micro-batcher feeds it. The
    engine keeps no per-call state, so ``run`` may be called from a worker thread.
    """

    def __init__(self, artifact: Artifact, step: OnnxStep | None = None) -> None:
        """``step``: the artifact's exported step in onnxruntime, for the one-token steps
        (task branches, forecasts, the closing tokens); PyTorch when None. Explanations
        always differentiate the PyTorch network (the same weights; the two agree within
        1e-4 in probability, ``tests/model/test_engine.py``)."""
        self.artifact = artifact
        self.engine = Engine(artifact.model, artifact.vocab, step)
        self.explainer = Explainer(artifact.model, artifact.vocab, artifact.config.max_length)

    @property
    def tasks(self) -> tuple[Task, ...]:
        """The tasks this model was trained for and serves."""
        return self.artifact.config.tasks

    def tokenize(self, timeline: Timeline, now: datetime) -> TokenSequence:
        """The model's input as known at ``now``: its frozen vocabulary and bins, its window."""
        return tokenize(
            timeline, self.artifact.vocab, self.artifact.bins, until=now,
            max_length=self.artifact.config.max_length,
        )  # fmt: skip

    def prepare(
        self,
        timeline: Timeline,
        sequence: TokenSequence,
        tasks: Sequence[Task],
        forecast: int,
        now: datetime,
        cached: CachedScan | None = None,
    ) -> Prepared:
        """ValueError when there is nothing to score."""
        if len(sequence) <= 1:
            raise ValueError("the record holds nothing to score")
        not_scored: dict[Task, str] = {}
        los_cut = None
        if Task.LENGTH_OF_STAY in tasks:
            los_cut = _los_cut(timeline, sequence, now)
            if los_cut is None:
                not_scored[Task.LENGTH_OF_STAY] = "no current inpatient stay to ask about"
        facts = DataFacts(
            resources=dict(timeline.source.resource_counts),
            dropped=dict(timeline.source.dropped),
            visits=len(timeline.visits),
            events=len(timeline.events),
            tokens=len(sequence),
            truncated=sequence.truncated,
            last_updated=timeline.source.last_updated,
        )
        return Prepared(
            PatientInput(sequence, los_cut=los_cut, cached=cached),
            tuple(tasks), forecast, not_scored, facts,
        )  # fmt: skip

    def score(
        self, timeline: Timeline, tasks: Sequence[Task], forecast: int, now: datetime
    ) -> Scored:
        """One patient from scratch, no cache, no batching: the reference the service's
        cached and batched answers must equal."""
        sequence = self.tokenize(timeline, now)
        return self.run([self.prepare(timeline, sequence, tasks, forecast, now)])[0]

    def run(self, batch: Sequence[Prepared]) -> list[Scored]:
        """Score a batch in one engine call: the union of the tasks asked and the longest
        forecast, each answer then cut to what its request asked (greedy forecasts do not
        depend on their length, and batched results equal unbatched ones)."""
        started = time.perf_counter()
        tasks = list(dict.fromkeys(t for p in batch for t in p.tasks))
        longest = max(p.forecast for p in batch)
        results = self.engine.score([p.input for p in batch], tasks, forecast=longest)
        seconds = time.perf_counter() - started
        return [
            Scored(
                input=p.input,
                probabilities={t: r.probabilities[t] for t in p.tasks if t in r.probabilities},
                not_scored=p.not_scored,
                forecast=r.forecast[: p.forecast],
                facts=p.facts,
                cache=r.cache,
                scanned_tokens=r.scanned_tokens,
                timings={"score_s": seconds},
            )
            for p, r in zip(batch, results, strict=True)
        ]


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
