"""FHIR resources of one patient to a Timeline (DESIGN.md 3.1).

Rules, each applied the same way to every source:
- Encounters become visits; encounters whose periods overlap or touch merge into one
  visit that takes the most acute class. An encounter with no end is ongoing unless its
  status says it is over, in which case it is a point in time.
- Events attach to a visit by their encounter reference, else by time containment, else
  they are dropped as ``outside_visit``. Event times are clamped into their visit.
- Observations are read when their category is laboratory or vital signs (or absent);
  a panel without a value of its own contributes its components.
- Conditions are labels only, attached to a visit where possible. A condition with no time
  of its own but an encounter reference (MIMIC-IV's billing diagnoses) takes the end of that
  encounter: the code is known once the stay is over.
- A MIMIC-IV hospital admission is an inpatient visit whatever its class says (see
  ``codes.MIMIC_ADMISSION_IDENTIFIERS``).
- Anything unusable is counted in ``SourceFacts.dropped`` as ``Type:reason``; nothing raises.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhir_adapter.codes import (
    CONDITION_SYSTEMS,
    LAB_SYSTEMS,
    MEDICATION_SYSTEMS,
    MIMIC_ADMISSION_CLASS_SYSTEMS,
    MIMIC_ADMISSION_IDENTIFIERS,
    PROCEDURE_SYSTEMS,
    pick_code,
    pick_display,
)
from fhir_adapter.dates import parse_date, parse_datetime
from fhir_adapter.record import JsonObject, PatientRecord
from fhir_adapter.references import parse_reference, reference_id
from fhir_adapter.timeline import (
    ConditionLabel,
    Event,
    EventKind,
    Patient,
    SourceFacts,
    Timeline,
    Visit,
    VisitClass,
)

_CLASS_CODES: dict[str, VisitClass] = {
    **dict.fromkeys(("imp", "acute", "nonac", "inpatient"), VisitClass.INPATIENT),
    # OBSENC (observation): an unplanned hospital stay to decide whether to admit. It is acute
    # care, so it counts as a return after discharge, but it is not an admission to index.
    **dict.fromkeys(("emer", "emergency", "urgentcare", "obsenc"), VisitClass.EMERGENCY),
    **dict.fromkeys(
        ("amb", "vr", "hh", "fld", "ambulatory", "outpatient", "wellness"),
        VisitClass.AMBULATORY,
    ),
}
_CLASS_RANK = {cls: rank for rank, cls in enumerate(VisitClass)}
_OVER_STATUSES = {"finished", "cancelled", "entered-in-error"}

# Statuses that mean the thing did not happen (or was recorded in error), per type.
_VOID_STATUSES: dict[str, frozenset[str]] = {
    "Encounter": frozenset({"entered-in-error", "cancelled", "planned"}),
    "Procedure": frozenset({"entered-in-error", "not-done", "preparation"}),
    "MedicationRequest": frozenset({"entered-in-error", "cancelled", "draft"}),
    "MedicationAdministration": frozenset({"entered-in-error", "not-done"}),
    "Observation": frozenset({"entered-in-error", "cancelled", "registered"}),
}
# FHIR observation-category codes, plus HL7 v2-0074 ``LAB`` (diagnostic service section),
# which some exporters put on lab results instead.
_USED_OBSERVATION_CATEGORIES = {"laboratory", "vital-signs", "lab"}
_MAX_UNIT_LENGTH = 64


@dataclass(frozen=True, slots=True)
class _Encounter:
    id: str
    start: datetime
    end: datetime | None
    visit_class: VisitClass


@dataclass(frozen=True, slots=True)
class _Pending:
    """An event or condition before it is attached to a visit."""

    rtype: str
    time: datetime | None  # None: a condition timed by its encounter, resolved before attaching
    encounter_id: str | None
    kind: EventKind | None  # None for a condition
    code: str
    value: float | None = None
    unit: str | None = None
    display: str | None = None


class _Drop(Exception):
    """Internal: a resource is unusable for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def build_timeline(record: PatientRecord) -> Timeline:
    """Normalise one patient's resources into a Timeline.

    The record must hold the Patient resource; callers count patients without one.
    """
    if record.patient is None:
        raise ValueError(f"record {record.patient_id!r} has no Patient resource")
    facts = SourceFacts(source=record.source)
    facts.dropped.update(record.dropped)
    facts.see("Patient", _last_updated(record.patient))
    patient = _patient(record.patient)

    encounters: list[_Encounter] = []
    pending: list[_Pending] = []
    for resource in _deduplicated(record.resources, facts):
        rtype = str(resource.get("resourceType"))
        facts.see(rtype, _last_updated(resource))
        try:
            if rtype == "Encounter":
                encounters.append(_encounter(resource))
            else:
                reader = _READERS.get(rtype)
                if reader is None:
                    raise _Drop("unsupported_type")
                # list() first: a resource is used whole or dropped whole.
                pending.extend(list(reader(resource, record.medications)))
        except _Drop as drop:
            facts.dropped[f"{rtype}:{drop.reason}"] += 1

    encounter_times = {e.id: e.end or e.start for e in encounters}
    visits, by_encounter = _merge_visits(encounters)
    events: list[Event] = []
    conditions: list[ConditionLabel] = []
    starts = [v.start for v in visits]
    for item in pending:
        time = item.time
        if time is None:
            time = encounter_times.get(item.encounter_id or "")
            if time is None:  # its encounter is missing or was dropped: nothing to time it by
                facts.dropped[f"{item.rtype}:no_time"] += 1
                continue
        visit = _attach(item, time, visits, starts, by_encounter)
        if item.kind is None:
            conditions.append(
                ConditionLabel(
                    code=item.code,
                    time=visit.clamp(time) if visit else time,
                    visit_id=visit.id if visit else None,
                )
            )
        elif visit is None:
            facts.dropped[f"{item.rtype}:outside_visit"] += 1
        else:
            if item.display is not None:
                facts.displays.setdefault(item.code, item.display)
            events.append(
                Event(
                    time=visit.clamp(time),
                    visit_id=visit.id,
                    kind=item.kind,
                    code=item.code,
                    value=item.value,
                    unit=item.unit,
                )
            )
    events.sort(key=lambda e: (e.time, _KIND_ORDER[e.kind], e.code, e.value or 0.0))
    conditions.sort(key=lambda c: (c.time, c.code))
    return Timeline(
        patient=patient, visits=visits, events=events, conditions=conditions, source=facts
    )


# --- patient and encounters -------------------------------------------------------------


def _patient(resource: JsonObject) -> Patient:
    deceased_at = parse_datetime(resource.get("deceasedDateTime"))
    deceased = deceased_at is not None or resource.get("deceasedBoolean") is True
    sex = resource.get("gender")
    return Patient(
        id=str(resource.get("id")),
        birth_date=parse_date(resource.get("birthDate")),
        sex=sex if isinstance(sex, str) else None,
        deceased=deceased,
        deceased_at=deceased_at,
    )


def _encounter(resource: JsonObject) -> _Encounter:
    status = _status(resource)
    if status in _VOID_STATUSES["Encounter"]:
        raise _Drop("not_performed")
    rid = resource.get("id")
    if not isinstance(rid, str) or not rid:
        raise _Drop("no_id")
    raw_period = resource.get("period")
    period: JsonObject = raw_period if isinstance(raw_period, dict) else {}
    start = _required_time(period.get("start"))
    end = parse_datetime(period.get("end"))
    if period.get("end") is not None and end is None:
        raise _Drop("unparsable_date")
    if end is not None and end < start:
        raise _Drop("end_before_start")
    if end is None and status in _OVER_STATUSES:
        end = start
    return _Encounter(id=rid, start=start, end=end, visit_class=_visit_class(resource))


def _visit_class(resource: JsonObject) -> VisitClass:
    cls = resource.get("class")
    codings = [cls] if isinstance(cls, dict) else cls if isinstance(cls, list) else []
    if _is_mimic_admission(resource, codings):
        return VisitClass.INPATIENT
    for coding in codings:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            found = _CLASS_CODES.get(coding["code"].strip().lower())
            if found is not None:
                return found
    return VisitClass.OTHER


def _is_mimic_admission(resource: JsonObject, class_codings: list[Any]) -> bool:
    """Whether the Encounter is a MIMIC-IV hospital admission (a row of hosp.admissions).

    Every such row is a stay in a hospital bed, observation and same-day-surgery admissions
    included, but the MIMIC ETL writes admission_type into the class, or maps it to ActCode
    AMB, SS, OBSENC or EMER; read as a class, most admissions would not be inpatient.
    """
    systems = [c.get("system") for c in class_codings if isinstance(c, dict)]
    if any(isinstance(s, str) and s in MIMIC_ADMISSION_CLASS_SYSTEMS for s in systems):
        return True
    systems = [i.get("system") for i in _dicts(resource.get("identifier"))]
    return any(isinstance(s, str) and s in MIMIC_ADMISSION_IDENTIFIERS for s in systems)


def _merge_visits(encounters: list[_Encounter]) -> tuple[list[Visit], dict[str, Visit]]:
    """Overlapping or touching encounters become one visit; returns visits and an index."""
    encounters.sort(key=lambda e: (e.start, e.id))
    groups: list[list[_Encounter]] = []
    group_end: datetime | None = None
    for enc in encounters:
        if groups and (group_end is None or enc.start <= group_end):
            groups[-1].append(enc)
            group_end = None if group_end is None or enc.end is None else max(group_end, enc.end)
        else:
            groups.append([enc])
            group_end = enc.end
    visits: list[Visit] = []
    by_encounter: dict[str, Visit] = {}
    for group in groups:
        ends = [e.end for e in group]
        visit = Visit(
            id=group[0].id,
            start=group[0].start,
            end=None if any(end is None for end in ends) else max(e for e in ends if e),
            visit_class=min((e.visit_class for e in group), key=_CLASS_RANK.__getitem__),
            encounter_ids=tuple(e.id for e in group),
        )
        visits.append(visit)
        by_encounter.update(dict.fromkeys(visit.encounter_ids, visit))
    return visits, by_encounter


def _attach(
    item: _Pending,
    time: datetime,
    visits: list[Visit],
    starts: list[datetime],
    by_encounter: dict[str, Visit],
) -> Visit | None:
    if item.encounter_id is not None and item.encounter_id in by_encounter:
        return by_encounter[item.encounter_id]
    index = bisect.bisect_right(starts, time) - 1
    if index >= 0 and visits[index].contains(time):
        return visits[index]
    return None


# --- clinical resources -------------------------------------------------------------------


def _procedure(resource: JsonObject, _: dict[str, JsonObject]) -> Iterator[_Pending]:
    _check_status(resource, "Procedure")
    code, display = _coded(resource.get("code"), PROCEDURE_SYSTEMS)
    time = _first_time(
        resource, ("performedDateTime", "performedPeriod.start", "performedPeriod.end")
    )
    encounter = _encounter_ref(resource, "encounter")
    yield _Pending("Procedure", time, encounter, EventKind.PROCEDURE, code, display=display)


def _medication(resource: JsonObject, medications: dict[str, JsonObject]) -> Iterator[_Pending]:
    rtype = str(resource.get("resourceType"))
    _check_status(resource, rtype)
    code, display = _coded(_medication_concept(resource, medications), MEDICATION_SYSTEMS)
    if rtype == "MedicationRequest":
        # MIMIC-IV leaves authoredOn out where a prescription has no pharmacy row; the start
        # of the dispense validity is then the earliest time the order is known to exist.
        time = _first_time(resource, ("authoredOn", "dispenseRequest.validityPeriod.start"))
        encounter = _encounter_ref(resource, "encounter")
    else:
        time = _first_time(resource, ("effectiveDateTime", "effectivePeriod.start"))
        encounter = _encounter_ref(resource, "context")
    yield _Pending(rtype, time, encounter, EventKind.MEDICATION, code, display=display)


def _medication_concept(resource: JsonObject, medications: dict[str, JsonObject]) -> Any:
    """The medication's CodeableConcept, inline, contained, or from a referenced Medication."""
    if "medicationCodeableConcept" in resource:
        return resource["medicationCodeableConcept"]
    holder = resource.get("medicationReference")
    ref = holder.get("reference") if isinstance(holder, dict) else None
    if isinstance(ref, str) and ref.startswith("#"):
        for contained in _dicts(resource.get("contained")):
            if contained.get("id") == ref[1:]:
                return contained.get("code")
        return None
    parsed = parse_reference(ref)
    if parsed is None:
        return None
    medication = medications.get(f"Medication/{parsed[1]}")
    return medication.get("code") if medication else None


def _observation(resource: JsonObject, _: dict[str, JsonObject]) -> Iterator[_Pending]:
    _check_status(resource, "Observation")
    if not _observation_used(resource):
        raise _Drop("category")
    time = _first_time(
        resource, ("effectiveDateTime", "effectiveInstant", "effectivePeriod.start", "issued")
    )
    encounter = _encounter_ref(resource, "encounter")
    components = _dicts(resource.get("component"))
    if "valueQuantity" not in resource and components:
        parts = [c for c in components if pick_code(c.get("code"), LAB_SYSTEMS)]
        if not parts:
            raise _Drop("no_code")
        for part in parts:
            value, unit = _quantity(part)
            code, display = _coded(part.get("code"), LAB_SYSTEMS)
            yield _Pending("Observation", time, encounter, EventKind.LAB, code, value, unit,
                           display)  # fmt: skip
        return
    code, display = _coded(resource.get("code"), LAB_SYSTEMS)
    value, unit = _quantity(resource)
    yield _Pending("Observation", time, encounter, EventKind.LAB, code, value, unit, display)


def _observation_used(resource: JsonObject) -> bool:
    categories = resource.get("category")
    if not isinstance(categories, list) or not categories:
        return True
    codes = set().union(*(_coding_codes(concept) for concept in categories))
    return any(code.lower() in _USED_OBSERVATION_CATEGORIES for code in codes)


def _quantity(holder: JsonObject) -> tuple[float | None, str | None]:
    """Value and unit of ``valueQuantity``; (None, None) when the result is not numeric."""
    quantity = holder.get("valueQuantity")
    if quantity is None:
        return None, None
    if not isinstance(quantity, dict):
        raise _Drop("bad_value")
    raw = quantity.get("value")
    if raw is None:
        return None, None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _Drop("bad_value")
    try:
        value = float(raw)  # an integer beyond the float range overflows
    except OverflowError:
        raise _Drop("bad_value") from None
    if not math.isfinite(value):
        raise _Drop("bad_value")
    unit = quantity.get("code", quantity.get("unit"))
    if unit is None:
        return value, None
    if (
        not isinstance(unit, str)
        or not unit.strip()
        or len(unit) > _MAX_UNIT_LENGTH
        or not unit.isprintable()
    ):
        raise _Drop("bad_unit")
    return value, unit.strip()


def _condition(resource: JsonObject, _: dict[str, JsonObject]) -> Iterator[_Pending]:
    if _coding_codes(resource.get("verificationStatus")) & {"entered-in-error", "refuted"}:
        raise _Drop("not_performed")
    code = _coded(resource.get("code"), CONDITION_SYSTEMS)[0]
    encounter = _encounter_ref(resource, "encounter")
    paths = ("onsetDateTime", "onsetPeriod.start", "recordedDate")
    if encounter is not None and all(_lookup(resource, path) is None for path in paths):
        # MIMIC-IV's diagnoses are an admission's billing codes, with no time of their own.
        yield _Pending("Condition", None, encounter, None, code)
        return
    time = _first_time(resource, paths)
    yield _Pending("Condition", time, encounter, None, code)


_READERS: dict[str, Callable[[JsonObject, dict[str, JsonObject]], Iterable[_Pending]]] = {
    "Procedure": _procedure,
    "MedicationRequest": _medication,
    "MedicationAdministration": _medication,
    "Observation": _observation,
    "Condition": _condition,
}
_KIND_ORDER = {kind: rank for rank, kind in enumerate(EventKind)}


# --- small helpers ------------------------------------------------------------------------


def _check_status(resource: JsonObject, rtype: str) -> None:
    if _status(resource) in _VOID_STATUSES.get(rtype, frozenset()):
        raise _Drop("not_performed")


def _status(resource: JsonObject) -> str | None:
    status = resource.get("status")
    return status if isinstance(status, str) else None


def _dicts(value: Any) -> list[JsonObject]:
    """The objects in a JSON array; anything else (a string, a number, null) holds none."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _coding_codes(concept: Any) -> set[str]:
    """The string codes of a CodeableConcept's codings."""
    if not isinstance(concept, dict):
        return set()
    return {c["code"] for c in _dicts(concept.get("coding")) if isinstance(c.get("code"), str)}


def _coded(concept: Any, preferred: tuple[str, ...]) -> tuple[str, str | None]:
    """The concept's code and how the source names it."""
    code = pick_code(concept, preferred)
    if code is None:
        raise _Drop("no_code")
    return code, pick_display(concept, code)


def _lookup(resource: JsonObject, path: str) -> Any:
    node: Any = resource
    for key in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _first_time(resource: JsonObject, paths: tuple[str, ...]) -> datetime:
    """The first of ``paths`` that holds a time; drops the resource if none parses."""
    present = False
    for path in paths:
        raw = _lookup(resource, path)
        if raw is None:
            continue
        present = True
        parsed = parse_datetime(raw)
        if parsed is not None:
            return parsed
    raise _Drop("unparsable_date" if present else "no_time")


def _required_time(raw: Any) -> datetime:
    if raw is None:
        raise _Drop("no_time")
    parsed = parse_datetime(raw)
    if parsed is None:
        raise _Drop("unparsable_date")
    return parsed


def _encounter_ref(resource: JsonObject, key: str) -> str | None:
    return reference_id(resource.get(key), "Encounter")


def _last_updated(resource: JsonObject) -> datetime | None:
    return parse_datetime(_lookup(resource, "meta.lastUpdated"))


def _deduplicated(resources: list[JsonObject], facts: SourceFacts) -> list[JsonObject]:
    """One copy of each ``Type/id``: the newest by ``meta.lastUpdated`` (later wins ties)."""
    kept: dict[tuple[str, str], int] = {}
    out: list[JsonObject | None] = []
    for resource in resources:
        rid = resource.get("id")
        if not isinstance(rid, str):
            out.append(resource)
            continue
        key = (str(resource.get("resourceType")), rid)
        previous = kept.get(key)
        if previous is not None:
            facts.dropped[f"{key[0]}:duplicate"] += 1
            older = out[previous]
            if older is not None and _newer(older, resource):
                continue
            out[previous] = None
        kept[key] = len(out)
        out.append(resource)
    return [r for r in out if r is not None]


def _newer(a: JsonObject, b: JsonObject) -> bool:
    """Whether ``a`` was updated strictly after ``b`` (a missing timestamp is oldest)."""
    ta, tb = _last_updated(a), _last_updated(b)
    return ta is not None and (tb is None or ta > tb)
