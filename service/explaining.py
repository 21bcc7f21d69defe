"""Explanations a clinician can check: which events raised or lowered each task's score,
named the way the record names them and dated in words ("Creatinine high, 3 days ago").

The attributions are ``model.explain``'s integrated gradients of exactly the input the
engine scored for this request (same window, same closing tokens, same length-of-stay
cut), so they explain the probability in the answer and nothing else. They cost a few
dozen forward and backward passes per task (docs/benchmarks.md, "Explanations"), so they
are computed only when asked (``explain=true``, a CDS card, the patient view), one at a
time per worker, off the event loop.

Lab words come from the artifact's value bins, which are quintiles of the training
population's values (``fhir_adapter.lab_bins``), not reference ranges: "high" means "in the
top two fifths of what the model saw in training". The view and the API docs say so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import orjson

from fhir_adapter.record import PatientRecord
from fhir_adapter.vocabulary import TokenType
from model.artifact import Artifact
from model.explain import DEFAULT_STEPS
from model.tasks import Task
from service import metrics
from service.patient_cache import sequence_digest
from service.scoring import Scored, Scorer
from service.state import ServiceState

_log = logging.getLogger(__name__)
BACKGROUND_MAX = 8  # explanations left running per worker after their caller gave up

# Quintile of the training population's values -> words (lab_bins.N_BINS == 5).
LAB_LEVELS = ("very low", "low", "mid-range", "high", "very high")
_KINDS = {
    TokenType.LAB: "lab",
    TokenType.MEDICATION: "medication",
    TokenType.PROCEDURE: "procedure",
}


@dataclass(frozen=True)
class ExplainedEvent:
    """One event of the record with its share of the task's probability."""

    token: str  # SYSTEM|code, with #bin for a lab value
    code: str
    display: str | None
    kind: str  # lab, medication or procedure
    time: datetime
    visit: int  # visit order, 1 = first visit in the window
    attribution: float
    words: str  # "Creatinine high, 3 days ago (2024-03-02)"


@dataclass(frozen=True)
class TaskExplanation:
    """``events``: every event the model saw, in record order; the sum of all attributions
    (events, visit structure and the closing tokens) is ``probability -
    baseline_probability - completeness_gap``."""

    task: Task
    probability: float
    baseline_probability: float
    completeness_gap: float
    steps: int
    structure: float  # what [CLS], visit boundaries and time gaps carried together
    events: tuple[ExplainedEvent, ...]

    def contributing(self, top: int) -> list[ExplainedEvent]:
        """The ``top`` events that raised the probability most (positive only)."""
        raised = sorted((e for e in self.events if e.attribution > 0), key=_by_size)
        return raised[:top]

    def protective(self, top: int) -> list[ExplainedEvent]:
        """The ``top`` events that lowered the probability most (negative only)."""
        lowered = sorted((e for e in self.events if e.attribution < 0), key=_by_size)
        return lowered[:top]


def _by_size(event: ExplainedEvent) -> tuple[float, datetime]:
    return (-abs(event.attribution), event.time)


@dataclass(frozen=True)
class _Attributed:
    """What the model computed for one task, before naming: cacheable, independent of
    when it is read (the words say "3 days ago" relative to the reading)."""

    probability: float
    baseline_probability: float
    completeness_gap: float
    steps: int
    structure: float
    events: tuple[tuple[str, str, float, int, float], ...]  # token, kind, epoch s, visit, attr


def _attribute(scorer: Scorer, scored: Scored, task: Task, steps: int) -> _Attributed:
    """Integrated gradients of ``task`` over exactly the input ``scored`` came from."""
    cut = scored.input.los_cut if task is Task.LENGTH_OF_STAY else None
    e = scorer.explainer.explain(scored.input.sequence, task, los_cut=cut, steps=steps)
    kinds = [_KINDS.get(t.kind, "event") for t in e.tokens]
    return _Attributed(
        probability=e.probability,
        baseline_probability=e.baseline_probability,
        completeness_gap=e.completeness_gap,
        steps=e.steps,
        structure=e.structure,
        events=tuple(
            (a.token, kinds[a.tokens[0]], a.time.timestamp(), a.visit_order, a.attribution)
            for a in e.events
            if a.seen
        ),
    )


def explain_scored(
    scorer: Scorer,
    scored: Scored,
    tasks: Sequence[Task],
    now: datetime,
    steps: int = DEFAULT_STEPS,
) -> dict[Task, TaskExplanation]:
    """Explain the tasks of ``tasks`` that ``scored`` holds a probability for (a task it
    could not score has nothing to explain). Blocking, uncached: the reference."""
    return {
        task: _named(scorer.artifact, task, _attribute(scorer, scored, task, steps), now)
        for task in tasks
        if task in scored.probabilities
    }


async def explain_cached(
    state: ServiceState,
    scorer: Scorer,
    scored: Scored,
    record: PatientRecord,
    tasks: Sequence[Task],
    now: datetime,
    compute: bool = True,
) -> dict[Task, TaskExplanation]:
    """``explain_scored`` with ``state.settings.explain_steps``, served from the patient
    cache when the same model explained the same task over exactly the same input (token
    digest and length-of-stay cut), else computed in a worker thread, one at a time per
    worker (``state.explaining``: each takes every core torch has, and a queue of them
    must not starve the engine's scoring of its thread), and cached. With ``compute``
    False only what the cache holds."""
    steps = state.settings.explain_steps
    digest = sequence_digest(scored.input.sequence, len(scored.input.sequence))
    base, patient = record.source, record.patient_id
    out: dict[Task, TaskExplanation] = {}
    for task in tasks:
        if task not in scored.probabilities:
            continue
        cut = scored.input.los_cut if task is Task.LENGTH_OF_STAY else None
        check = f"{digest}:{cut}"
        kind = f"explain:{scorer.artifact.sha256}:{steps}:{task.value}"
        raw = await state.patients.load_entry(kind, base, patient)
        attributed = _decode(raw, check) if raw is not None else None
        if attributed is None and not compute:
            continue  # only looking: the caller that computes counts the miss
        metrics.CACHE_REQUESTS.labels("explanation", "hit" if attributed else "miss").inc()
        if attributed is None:
            attributed = await anyio.to_thread.run_sync(
                _attribute, scorer, scored, task, steps, limiter=state.explaining,
                abandon_on_cancel=True,  # a stopping service does not wait for the thread
            )  # fmt: skip
            await state.patients.save_entry(kind, base, patient, _encode(attributed, check))
        out[task] = _named(scorer.artifact, task, attributed, now)
    return out


async def explain_within(
    state: ServiceState,
    scorer: Scorer,
    scored: Scored,
    record: PatientRecord,
    tasks: Sequence[Task],
    now: datetime,
    wait: float,
) -> dict[Task, TaskExplanation] | None:
    """``explain_cached``, waited for at most ``wait`` seconds; None when it takes longer.
    The work goes on in the background and lands in the cache, so the next call for the
    same input (a card when the chart is opened again, the patient view) finds it: a CDS
    client must not be kept waiting for tens of seconds, and the work is not thrown away."""
    cached = await explain_cached(state, scorer, scored, record, tasks, now, compute=False)
    if set(cached) == set(tasks) & set(scored.probabilities):
        return cached
    if len(state.background) >= BACKGROUND_MAX:  # busy: queue nothing more
        return None
    missing = [task for task in tasks if task not in cached]  # what was found is not read again
    job = asyncio.ensure_future(explain_cached(state, scorer, scored, record, missing, now))
    try:
        found = {**cached, **await asyncio.wait_for(asyncio.shield(job), wait)}
        return {task: found[task] for task in tasks if task in found}
    except TimeoutError:
        state.background.add(job)
        job.add_done_callback(_forget(state))
        return None


def _forget(state: ServiceState) -> Callable[[asyncio.Future[Any]], None]:
    def done(job: asyncio.Future[Any]) -> None:
        state.background.discard(job)
        if not job.cancelled() and job.exception() is not None:
            _log.warning("a background explanation failed: %r", job.exception())

    return done


def _encode(attributed: _Attributed, check: str) -> bytes:
    return orjson.dumps({"check": check, **asdict(attributed)})


def _decode(raw: bytes, check: str) -> _Attributed | None:
    """The cached attributions if they are for ``check``'s input; a stale or malformed
    entry is a miss."""
    try:
        data = orjson.loads(raw)
        if data.pop("check") != check:
            return None
        events = tuple(
            (str(t), str(k), float(s), int(v), float(a)) for t, k, s, v, a in data.pop("events")
        )
        return _Attributed(events=events, **data)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _named(
    artifact: Artifact, task: Task, attributed: _Attributed, now: datetime
) -> TaskExplanation:
    return TaskExplanation(
        task=task,
        probability=attributed.probability,
        baseline_probability=attributed.baseline_probability,
        completeness_gap=attributed.completeness_gap,
        steps=attributed.steps,
        structure=attributed.structure,
        events=tuple(_event(artifact, *event, now) for event in attributed.events),
    )


def _event(
    artifact: Artifact,
    token: str,
    kind: str,
    epoch: float,
    visit: int,
    attribution: float,
    now: datetime,
) -> ExplainedEvent:
    display = artifact.display(token)
    time = datetime.fromtimestamp(epoch, UTC)
    return ExplainedEvent(
        token=token,
        code=token.split("#", 1)[0],
        display=display,
        kind=kind,
        time=time,
        visit=visit,
        attribution=attribution,
        words=event_words(token, display, time, now),
    )


def event_words(token: str, display: str | None, time: datetime, now: datetime) -> str:
    """ "Creatinine high, 3 days ago (2024-03-02)": the name (the code when the data named
    it nowhere), the lab level for a binned lab value, and when."""
    name = display or token.split("#", 1)[0]
    _, _, bin_text = token.partition("#")
    if bin_text.isdigit() and int(bin_text) < len(LAB_LEVELS):
        name = f"{name} {LAB_LEVELS[int(bin_text)]}"
    return f"{name}, {ago(now - time)} ({time.date().isoformat()})"


def ago(elapsed: timedelta) -> str:
    """How long ago, in the largest whole unit a reader would use."""
    seconds = elapsed.total_seconds()
    if seconds < 0:
        return "scheduled later"  # an event dated after now (a planned procedure)
    hours = seconds / 3600
    if hours < 1:
        return "within the last hour"
    if hours < 24:
        return _plural(int(hours), "hour") + " ago"
    days = int(hours // 24)
    if days == 1:
        return "yesterday"
    for limit, size, unit in ((14, 1, "day"), (61, 7, "week"), (730, 30, "month")):
        if days < limit:
            return _plural(days // size, unit) + " ago"
    return _plural(days // 365, "year") + " ago"


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("" if n == 1 else "s")


def explanation_json(explanation: TaskExplanation, top: int) -> dict[str, Any]:
    """The API's form: the top contributing and protective events with the check numbers."""
    return {
        "probability": explanation.probability,
        "baseline_probability": explanation.baseline_probability,
        "completeness_gap": explanation.completeness_gap,
        "steps": explanation.steps,
        "contributing": [event_json(e) for e in explanation.contributing(top)],
        "protective": [event_json(e) for e in explanation.protective(top)],
    }


def event_json(event: ExplainedEvent) -> dict[str, Any]:
    return {
        "token": event.token,
        "code": event.code,
        "display": event.display,
        "kind": event.kind,
        "time": event.time.isoformat(),
        "visit": event.visit,
        "attribution": event.attribution,
        "words": event.words,
    }
