"""The patient timeline: the one data type every later stage reads (DESIGN.md 3.1).

A Timeline is what is left of a patient's FHIR record once it has been checked and
normalised: visits with merged periods, coded events attached to visits, and condition
labels. Everything that could not be used is counted in ``SourceFacts.dropped`` by reason,
so a record is never half-built silently. All datetimes are timezone-aware UTC.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum


class VisitClass(StrEnum):
    """Encounter class folded to the four kinds the tasks care about.

    The order of declaration is the precedence used when overlapping encounters are merged:
    a merged visit takes the most acute class among its encounters.
    """

    INPATIENT = "inpatient"
    EMERGENCY = "emergency"
    AMBULATORY = "ambulatory"
    OTHER = "other"


class EventKind(StrEnum):
    """The three kinds of input event EHRMamba reads; conditions are labels, never events."""

    PROCEDURE = "procedure"
    MEDICATION = "medication"
    LAB = "lab"


@dataclass(frozen=True, slots=True)
class Patient:
    """Demographics needed for the age stream and the mortality label.

    ``deceased`` is True when the source says so even without a time
    (``deceasedBoolean``); ``deceased_at`` is set only when a time is known.
    """

    id: str
    birth_date: date | None
    sex: str | None
    deceased: bool
    deceased_at: datetime | None


@dataclass(frozen=True, slots=True)
class Visit:
    """One stay or contact: one or more overlapping Encounters merged.

    ``end`` is None while the visit is ongoing. ``encounter_ids`` lists every merged
    Encounter so events that reference any of them attach here.
    """

    id: str
    start: datetime
    end: datetime | None
    visit_class: VisitClass
    encounter_ids: tuple[str, ...]

    def contains(self, time: datetime) -> bool:
        """Whether ``time`` falls within the visit period (an ongoing visit is open-ended)."""
        return self.start <= time and (self.end is None or time <= self.end)

    def clamp(self, time: datetime) -> datetime:
        """``time`` moved into the visit period, so event order never contradicts visit order."""
        if time < self.start:
            return self.start
        if self.end is not None and time > self.end:
            return self.end
        return time


@dataclass(frozen=True, slots=True)
class Event:
    """One input event. ``code`` is ``SYSTEM|CODE`` with a short system name (``LOINC|2345-7``).

    ``value`` and ``unit`` are set for labs with a numeric result; ``unit`` is a UCUM code
    where the source gives one.
    """

    time: datetime
    visit_id: str
    kind: EventKind
    code: str
    value: float | None = None
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class ConditionLabel:
    """A diagnosis, kept only to build task labels. ``visit_id`` is None when unattached."""

    code: str
    time: datetime
    visit_id: str | None


@dataclass(slots=True)
class SourceFacts:
    """Where a timeline came from and what was left out of it.

    ``last_updated`` is the newest ``meta.lastUpdated`` seen: the watermark for the next
    incremental fetch (``_lastUpdated=gt<watermark>``). ``displays`` holds how the source
    named each event code (its coding's ``display``), for people reading forecasts and
    explanations; the model never sees it.
    """

    source: str
    last_updated: datetime | None = None
    resource_counts: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    displays: dict[str, str] = field(default_factory=dict)

    def see(self, resource_type: str, last_updated: datetime | None) -> None:
        """Count one resource read and move the watermark forward."""
        self.resource_counts[resource_type] += 1
        if last_updated is not None and (
            self.last_updated is None or last_updated > self.last_updated
        ):
            self.last_updated = last_updated


@dataclass(slots=True)
class Timeline:
    """A patient's usable record: visits and events sorted by time, plus labels and facts."""

    patient: Patient
    visits: list[Visit]
    events: list[Event]
    conditions: list[ConditionLabel]
    source: SourceFacts

    def visit(self, visit_id: str) -> Visit:
        """The visit with this id (raises KeyError for an unknown id)."""
        for visit in self.visits:
            if visit.id == visit_id:
                return visit
        raise KeyError(visit_id)
