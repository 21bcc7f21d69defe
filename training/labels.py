"""Task labels on index visits (DESIGN.md 3.3, the paper's appendix B.2, stated prospectively).

Index visits are inpatient visits, or every visit when the data carries no visit classes.
Each sample says where its input ends (``cut``): the model sees only what was known then.

| task | samples | input ends | label 1 when |
|---|---|---|---|
| mortality | last index visit | its end | death in [start, end + 32 d] |
| length_of_stay | index visits >= 24 h | start + 24 h | the stay lasts > 7 days |
| readmission | every index visit | its end | inpatient or ED visit starts in (end, end + 30 d] |
| conditions | one per patient | end of record | a Condition in the task's code set |

Exclusions, each counted as ``task:reason`` rather than guessed:
- ``open_stay``: the index visit has no end yet (mortality, length of stay, readmission).
- ``stay_under_24h``: length of stay only; at 24 h such a patient has already left, so the
  question is not asked at serving time, and its input would reveal the discharge.
- ``death_time_unknown``: the patient is deceased but the record has no time of death.
- ``not_observed``: no death and no (re)admission, but the data ends before the window
  does (32 days for mortality, 30 for readmission), so the outcome is unknown. The data
  ends at ``observation_end``, the newest timestamp in the source.
- ``death_before_stay``: mortality only; the record says the patient died before the stay
  began, which contradicts itself.
- ``died_before_window``: readmission only; death within 30 days without a visit first
  means readmission was never observable.
- ``no_index_visit``, ``no_visits``: nothing to predict on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from fhir_adapter.timeline import Timeline, Visit, VisitClass
from model.tasks import CONDITION_TASKS, Task
from training.codesets import CodeSet

MORTALITY_WINDOW = timedelta(days=32)
READMISSION_WINDOW = timedelta(days=30)
LOS_CUT = timedelta(hours=24)
LONG_STAY = timedelta(days=7)
_READMISSION_CLASSES = (VisitClass.INPATIENT, VisitClass.EMERGENCY)


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled example. ``cut`` None means the whole record."""

    task: Task
    label: int
    cut: datetime | None
    visit_id: str | None


@dataclass(frozen=True, slots=True)
class CohortContext:
    """Facts about the whole source that labels depend on."""

    observation_end: datetime
    classes_known: bool


def label_patient(
    timeline: Timeline, codesets: dict[Task, CodeSet], context: CohortContext
) -> tuple[list[Sample], Counter[str]]:
    """All samples of one patient, and the exclusions counted as ``task:reason``."""
    samples: list[Sample] = []
    excluded: Counter[str] = Counter()
    if not timeline.visits:
        excluded.update(f"{task.value}:no_visits" for task in Task)
        return samples, excluded
    index = [v for v in timeline.visits if _is_index(v, context)]
    if not index:
        for task in (Task.MORTALITY, Task.LENGTH_OF_STAY, Task.READMISSION):
            excluded[f"{task.value}:no_index_visit"] += 1
    else:
        _mortality(timeline, index[-1], context, samples, excluded)
        for visit in index:
            _length_of_stay(visit, samples, excluded)
            _readmission(timeline, visit, context, samples, excluded)
    codes = {c.code for c in timeline.conditions}
    for task in CONDITION_TASKS:
        label = int(any(codesets[task].matches(code) for code in codes))
        samples.append(Sample(task, label, None, None))
    return samples, excluded


def _is_index(visit: Visit, context: CohortContext) -> bool:
    return not context.classes_known or visit.visit_class is VisitClass.INPATIENT


def _mortality(
    timeline: Timeline,
    visit: Visit,
    context: CohortContext,
    samples: list[Sample],
    excluded: Counter[str],
) -> None:
    task = Task.MORTALITY
    if visit.end is None:
        excluded[f"{task.value}:open_stay"] += 1
        return
    patient = timeline.patient
    if patient.deceased and patient.deceased_at is None:
        excluded[f"{task.value}:death_time_unknown"] += 1
        return
    if patient.deceased_at is not None and patient.deceased_at < visit.start:
        excluded[f"{task.value}:death_before_stay"] += 1  # contradictory record
        return
    window_end = visit.end + MORTALITY_WINDOW
    died = patient.deceased_at is not None and visit.start <= patient.deceased_at <= window_end
    if not died and patient.deceased_at is None and context.observation_end < window_end:
        excluded[f"{task.value}:not_observed"] += 1
        return
    samples.append(Sample(task, int(died), visit.end, visit.id))


def _length_of_stay(visit: Visit, samples: list[Sample], excluded: Counter[str]) -> None:
    task = Task.LENGTH_OF_STAY
    if visit.end is None:
        excluded[f"{task.value}:open_stay"] += 1
        return
    if visit.end - visit.start < LOS_CUT:
        excluded[f"{task.value}:stay_under_24h"] += 1
        return
    label = int(visit.end - visit.start > LONG_STAY)
    samples.append(Sample(task, label, visit.start + LOS_CUT, visit.id))


def _readmission(
    timeline: Timeline,
    visit: Visit,
    context: CohortContext,
    samples: list[Sample],
    excluded: Counter[str],
) -> None:
    task = Task.READMISSION
    if visit.end is None:
        excluded[f"{task.value}:open_stay"] += 1
        return
    window_end = visit.end + READMISSION_WINDOW
    readmitted = [
        v
        for v in timeline.visits
        if visit.end < v.start <= window_end
        and (not context.classes_known or v.visit_class in _READMISSION_CLASSES)
    ]
    patient = timeline.patient
    if readmitted:
        samples.append(Sample(task, 1, visit.end, visit.id))
    elif patient.deceased and patient.deceased_at is None:
        excluded[f"{task.value}:death_time_unknown"] += 1
    elif patient.deceased_at is not None and patient.deceased_at <= window_end:
        excluded[f"{task.value}:died_before_window"] += 1
    elif context.observation_end < window_end:
        excluded[f"{task.value}:not_observed"] += 1
    else:
        samples.append(Sample(task, 0, visit.end, visit.id))


def observation_end(timelines: list[Timeline]) -> datetime | None:
    """The newest timestamp in a set of timelines: where the data stops observing anyone."""
    times = [
        t
        for tl in timelines
        for t in (
            *(v.end or v.start for v in tl.visits),
            *(e.time for e in tl.events[-1:]),
            *((tl.patient.deceased_at,) if tl.patient.deceased_at else ()),
        )
    ]
    return max(times, default=None)
