"""Every rule of ``build_timeline`` (DESIGN.md 3.1), pinned on small hand-built resources.

Each test builds one patient's record from a few FHIR dicts and checks one rule, so a
failure names the rule that broke.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, date, datetime
from typing import Any

import pytest

from fhir_adapter.codes import short_system
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from fhir_adapter.timeline import EventKind, Timeline, VisitClass

JsonObject = dict[str, Any]

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# --- tiny builders -----------------------------------------------------------------------


def utc(day: int, hour: int = 0, minute: int = 0, month: int = 3, year: int = 2020) -> datetime:
    """An aware UTC datetime (March 2020 unless told otherwise)."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def iso(day: int, hour: int = 0, minute: int = 0) -> str:
    """The FHIR instant for ``utc(day, hour, minute)``."""
    return utc(day, hour, minute).isoformat().replace("+00:00", "Z")


def concept(*codings: tuple[str | None, str]) -> JsonObject:
    """A CodeableConcept from ``(system, code)`` pairs; a None system is left out."""
    return {
        "coding": [
            {"code": code} if system is None else {"system": system, "code": code}
            for system, code in codings
        ]
    }


def patient(**extra: Any) -> JsonObject:
    """Patient p1 with any extra fields."""
    return {"resourceType": "Patient", "id": "p1", **extra}


def encounter(
    eid: str,
    start: str | None,
    end: str | None = None,
    cls: str = "AMB",
    status: str = "finished",
    **extra: Any,
) -> JsonObject:
    """An Encounter of p1; ``end=None`` leaves the period open."""
    period: JsonObject = {} if start is None else {"start": start}
    if end is not None:
        period["end"] = end
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": status,
        "class": {"system": ACT_CODE, "code": cls},
        "subject": {"reference": "Patient/p1"},
        "period": period,
        **extra,
    }


def observation(
    oid: str,
    time: str | None,
    code: str = "2345-7",
    system: str | None = LOINC,
    enc: str | None = None,
    **extra: Any,
) -> JsonObject:
    """A lab Observation of p1 at ``time`` (left out when None), optionally in ``enc``."""
    resource: JsonObject = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": concept((system, code)),
    }
    if time is not None:
        resource["effectiveDateTime"] = time
    if enc is not None:
        resource["encounter"] = {"reference": f"Encounter/{enc}"}
    return {**resource, **extra}


def quantity(value: Any, **fields: Any) -> JsonObject:
    """A ``valueQuantity`` field for an Observation or component."""
    return {"valueQuantity": {"value": value, **fields}}


def procedure(rid: str, time: str, code: str = "80146002", **extra: Any) -> JsonObject:
    """A SNOMED Procedure of p1."""
    return {
        "resourceType": "Procedure",
        "id": rid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "code": concept((SNOMED, code)),
        "performedDateTime": time,
        **extra,
    }


def med_request(rid: str, time: str, **extra: Any) -> JsonObject:
    """A MedicationRequest of p1; the medication itself comes in ``extra``."""
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "authoredOn": time,
        **extra,
    }


def condition(rid: str, time: str, code: str = "E11.9", **extra: Any) -> JsonObject:
    """An ICD-10-CM Condition of p1."""
    return {
        "resourceType": "Condition",
        "id": rid,
        "subject": {"reference": "Patient/p1"},
        "code": concept((ICD10CM, code)),
        "onsetDateTime": time,
        **extra,
    }


def coded(resource: JsonObject, code: Any) -> JsonObject:
    """``resource`` with its ``code`` field replaced by ``code`` (any JSON)."""
    return {**resource, "code": code}


def updated(resource: JsonObject, when: str) -> JsonObject:
    """``resource`` with ``meta.lastUpdated`` set."""
    return {**resource, "meta": {"lastUpdated": when}}


def build(
    *resources: JsonObject,
    the_patient: JsonObject | None = None,
    medications: dict[str, JsonObject] | None = None,
) -> Timeline:
    """The timeline of p1 holding ``resources``."""
    record = PatientRecord(
        patient_id="p1",
        patient=the_patient or patient(),
        resources=list(resources),
        source="test",
        medications=medications or {},
    )
    return build_timeline(record)


def day_visit(eid: str = "e1", cls: str = "IMP") -> JsonObject:
    """A visit covering all of 1-3 March 2020 that most event tests attach to."""
    return encounter(eid, iso(1), iso(3, 23, 59), cls=cls)


# --- visits ------------------------------------------------------------------------------


def test_overlapping_encounters_merge_into_one_visit() -> None:
    """Encounters whose periods overlap are one stay: one visit spanning both."""
    timeline = build(
        encounter("b", iso(1, 11), iso(1, 13)),
        encounter("a", iso(1, 10), iso(1, 12)),
    )
    [visit] = timeline.visits
    assert visit.start == utc(1, 10)
    assert visit.end == utc(1, 13)
    assert visit.id == "a"  # the earliest encounter names the visit
    assert visit.encounter_ids == ("a", "b")


def test_touching_encounters_merge() -> None:
    """One encounter ending when the next starts (an ED stay, then admission) is one visit."""
    timeline = build(
        encounter("ed", iso(1, 10), iso(1, 12), cls="EMER"),
        encounter("ward", iso(1, 12), iso(2, 12), cls="IMP"),
    )
    [visit] = timeline.visits
    assert (visit.start, visit.end) == (utc(1, 10), utc(2, 12))
    assert visit.encounter_ids == ("ed", "ward")


def test_encounter_inside_a_longer_one_keeps_the_longer_end() -> None:
    """A short encounter nested in a long one must not cut the merged visit short."""
    timeline = build(
        encounter("long", iso(1), iso(5)),
        encounter("short", iso(2), iso(2, 1)),
        encounter("later", iso(4), iso(6)),
    )
    [visit] = timeline.visits
    assert visit.end == utc(6)
    assert visit.encounter_ids == ("long", "short", "later")


def test_separate_encounters_stay_separate_visits() -> None:
    """A gap, however short, separates two visits; visits come out in time order."""
    timeline = build(
        encounter("second", iso(1, 12, 1), iso(1, 13)),
        encounter("first", iso(1, 10), iso(1, 12)),
    )
    assert [v.id for v in timeline.visits] == ["first", "second"]


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (("AMB", "IMP"), VisitClass.INPATIENT),
        (("EMER", "IMP"), VisitClass.INPATIENT),
        (("IMP", "EMER", "AMB"), VisitClass.INPATIENT),
        (("AMB", "EMER"), VisitClass.EMERGENCY),
        (("XYZ", "EMER"), VisitClass.EMERGENCY),
        (("XYZ", "AMB"), VisitClass.AMBULATORY),
        (("XYZ", "XYZ"), VisitClass.OTHER),
    ],
)
def test_merged_visit_takes_the_most_acute_class(
    classes: tuple[str, ...], expected: VisitClass
) -> None:
    """Precedence inpatient > emergency > ambulatory > other, whatever the encounter order."""
    encounters = [
        encounter(f"e{i}", iso(1, 10 + i), iso(1, 20), cls=cls) for i, cls in enumerate(classes)
    ]
    [visit] = build(*encounters).visits
    assert visit.visit_class is expected
    [reversed_visit] = build(*reversed(encounters)).visits
    assert reversed_visit.visit_class is expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("IMP", VisitClass.INPATIENT),
        ("ACUTE", VisitClass.INPATIENT),
        ("inpatient", VisitClass.INPATIENT),  # Synthea STU3 style
        ("EMER", VisitClass.EMERGENCY),
        ("emergency", VisitClass.EMERGENCY),
        ("urgentcare", VisitClass.EMERGENCY),
        ("AMB", VisitClass.AMBULATORY),
        ("VR", VisitClass.AMBULATORY),
        ("wellness", VisitClass.AMBULATORY),  # Synthea STU3 style
        ("outpatient", VisitClass.AMBULATORY),
        (" imp ", VisitClass.INPATIENT),
        ("SS", VisitClass.OTHER),
        ("nonsense", VisitClass.OTHER),
    ],
)
def test_class_code_mapping(code: str, expected: VisitClass) -> None:
    """HL7 v3 ActCode and Synthea's lowercase names fold to the four classes."""
    [visit] = build(encounter("e1", iso(1), iso(2), cls=code)).visits
    assert visit.visit_class is expected


def test_class_missing_or_given_as_a_list() -> None:
    """No class is 'other'; a list of codings (R5 style) is searched for a known code."""
    no_class = {k: v for k, v in encounter("e1", iso(1), iso(2)).items() if k != "class"}
    as_list = {**encounter("e2", iso(5), iso(6)), "class": [{"code": "x"}, {"code": "EMER"}]}
    visits = build(no_class, as_list).visits
    assert [v.visit_class for v in visits] == [VisitClass.OTHER, VisitClass.EMERGENCY]


def test_ongoing_encounter_has_no_end_and_takes_later_events() -> None:
    """No end and status in-progress: the visit is ongoing, open-ended for attachment."""
    timeline = build(
        encounter("e1", iso(1), None, status="in-progress"),
        observation("o1", "2020-09-01T00:00:00Z"),
    )
    [visit] = timeline.visits
    assert visit.end is None
    [event] = timeline.events
    assert (event.visit_id, event.time) == ("e1", utc(1, month=9))


def test_ongoing_encounter_merged_with_a_finished_one_stays_ongoing() -> None:
    """A merged visit is ongoing while any of its encounters is."""
    timeline = build(
        encounter("e1", iso(1), iso(3)),
        encounter("e2", iso(2), None, status="in-progress"),
    )
    [visit] = timeline.visits
    assert visit.end is None


def test_finished_encounter_without_end_is_a_point_visit() -> None:
    """Status finished but no end: the visit is the instant it started, not ongoing."""
    timeline = build(
        encounter("e1", iso(1, 10), None, status="finished"),
        observation("at", iso(1, 10)),
        observation("after", iso(1, 10, 1)),
    )
    [visit] = timeline.visits
    assert visit.end == visit.start == utc(1, 10)
    assert [e.time for e in timeline.events] == [utc(1, 10)]
    assert timeline.source.dropped == Counter({"Observation:outside_visit": 1})


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error", "planned"])
def test_void_encounters_are_dropped(status: str) -> None:
    """Encounters that did not happen make no visit and are counted."""
    timeline = build(encounter("e1", iso(1), iso(2), status=status))
    assert timeline.visits == []
    assert timeline.source.dropped == Counter({"Encounter:not_performed": 1})


def test_encounter_without_start_or_with_end_before_start_is_dropped() -> None:
    """A period that cannot be placed on the time line is counted, not guessed."""
    timeline = build(
        encounter("no_start", None, iso(2)),
        encounter("backwards", iso(2), iso(1)),
        encounter("bad_end", iso(1), "soon"),
    )
    assert timeline.visits == []
    assert timeline.source.dropped == Counter(
        {
            "Encounter:no_time": 1,
            "Encounter:end_before_start": 1,
            "Encounter:unparsable_date": 1,
        }
    )


# --- attaching events --------------------------------------------------------------------


def test_event_attaches_by_encounter_reference_even_outside_the_period() -> None:
    """The reference wins over time: a late-charted result belongs to its encounter."""
    timeline = build(
        encounter("e1", iso(1), iso(2)),
        encounter("e2", iso(5), iso(6)),
        observation("late", iso(5, 12), enc="e1"),
        observation("early", iso(1), enc="e2"),
    )
    by_code = {e.visit_id: e.time for e in timeline.events}
    assert by_code == {"e1": utc(2), "e2": utc(5)}  # clamped to end / start of their visit


def test_reference_to_a_merged_encounter_attaches_to_the_merged_visit() -> None:
    """Any encounter id merged into a visit leads to that visit."""
    timeline = build(
        encounter("a", iso(1), iso(3)),
        encounter("b", iso(2), iso(4)),
        observation("o1", iso(2, 5), enc="b"),
    )
    [event] = timeline.events
    assert event.visit_id == "a"


def test_event_attaches_by_time_when_it_has_no_reference() -> None:
    """Without a reference the visit whose period contains the time is used."""
    timeline = build(
        encounter("e1", iso(1), iso(2)),
        encounter("e2", iso(5), iso(6)),
        observation("o1", iso(5, 12)),
        observation("edge", iso(2)),  # the end instant is inside
    )
    assert sorted((e.visit_id, e.time) for e in timeline.events) == [
        ("e1", utc(2)),
        ("e2", utc(5, 12)),
    ]


def test_reference_to_an_unknown_encounter_falls_back_to_time() -> None:
    """A dangling reference (encounter not exported, or dropped) still attaches by time."""
    timeline = build(
        encounter("e1", iso(1), iso(2)),
        encounter("void", iso(1), iso(2), status="entered-in-error"),
        observation("o1", iso(1, 12), enc="missing"),
        observation("o2", iso(1, 13), enc="void"),
    )
    assert [e.visit_id for e in timeline.events] == ["e1", "e1"]


def test_event_outside_every_visit_is_dropped() -> None:
    """No reference and no containing visit: dropped as outside_visit, per resource type."""
    timeline = build(
        encounter("e1", iso(1), iso(2)),
        observation("o1", iso(3)),
        procedure("pr1", iso(10)),
        med_request("m1", iso(20), medicationCodeableConcept=concept((RXNORM, "197361"))),
    )
    assert timeline.events == []
    assert timeline.source.dropped == Counter(
        {
            "Observation:outside_visit": 1,
            "Procedure:outside_visit": 1,
            "MedicationRequest:outside_visit": 1,
        }
    )


def test_event_with_no_visits_at_all_is_dropped() -> None:
    """A patient with no encounters keeps no events."""
    timeline = build(observation("o1", iso(1)))
    assert timeline.events == []
    assert timeline.source.dropped == Counter({"Observation:outside_visit": 1})


# --- medications -------------------------------------------------------------------------


def test_medication_from_codeable_concept() -> None:
    """The inline medicationCodeableConcept gives an RXNORM medication event."""
    timeline = build(
        day_visit(),
        med_request("m1", iso(2), medicationCodeableConcept=concept((RXNORM, "197361"))),
    )
    [event] = timeline.events
    assert (event.kind, event.code, event.value, event.unit) == (
        EventKind.MEDICATION,
        "RXNORM|197361",
        None,
        None,
    )


def test_medication_from_a_referenced_medication_resource() -> None:
    """medicationReference to Medication/id is looked up in the record's medications."""
    medications = {
        "Medication/med1": {
            "resourceType": "Medication",
            "id": "med1",
            "code": concept((RXNORM, "314076")),
        }
    }
    timeline = build(
        day_visit(),
        med_request("m1", iso(2), medicationReference={"reference": "Medication/med1"}),
        med_request("m2", iso(2), medicationReference={"reference": "Medication/unknown"}),
        medications=medications,
    )
    assert [e.code for e in timeline.events] == ["RXNORM|314076"]
    assert timeline.source.dropped == Counter({"MedicationRequest:no_code": 1})


def test_medication_from_a_contained_medication() -> None:
    """``#id`` points into the resource's own ``contained`` list."""
    contained = [
        {"resourceType": "Medication", "id": "other", "code": concept((RXNORM, "1"))},
        {"resourceType": "Medication", "id": "med", "code": concept((RXNORM, "2"))},
    ]
    timeline = build(
        day_visit(),
        med_request("m1", iso(2), contained=contained, medicationReference={"reference": "#med"}),
        med_request("m2", iso(2), contained=contained, medicationReference={"reference": "#gone"}),
    )
    assert [e.code for e in timeline.events] == ["RXNORM|2"]
    assert timeline.source.dropped == Counter({"MedicationRequest:no_code": 1})


def test_medication_administration_uses_context_and_effective_time() -> None:
    """MedicationAdministration attaches by ``context`` and times by ``effective[x]``."""
    administration = {
        "resourceType": "MedicationAdministration",
        "id": "ma1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "context": {"reference": "Encounter/e1"},
        "medicationCodeableConcept": concept((RXNORM, "197361")),
        "effectivePeriod": {"start": iso(9)},
    }
    timeline = build(day_visit(), administration)
    [event] = timeline.events
    assert (event.kind, event.visit_id, event.time) == (EventKind.MEDICATION, "e1", utc(3, 23, 59))


# --- observations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("category", "kept"),
    [
        (None, True),
        ("laboratory", True),
        ("vital-signs", True),
        ("social-history", False),
        ("survey", False),
    ],
)
def test_observation_category_filter(category: str | None, kept: bool) -> None:
    """Only lab and vital-sign observations (or uncategorised ones) are events."""
    extra: JsonObject = {} if category is None else {"category": [concept((None, category))]}
    timeline = build(day_visit(), observation("o1", iso(2), **extra))
    assert len(timeline.events) == int(kept)
    assert timeline.source.dropped == (Counter() if kept else Counter({"Observation:category": 1}))


def test_observation_with_several_categories_is_kept_if_any_is_used() -> None:
    """A result filed under both survey and laboratory is a lab."""
    categories = [concept((None, "survey")), concept((None, "laboratory"))]
    timeline = build(day_visit(), observation("o1", iso(2), category=categories))
    assert len(timeline.events) == 1


def blood_pressure(oid: str, systolic: Any, diastolic: Any) -> JsonObject:
    """A vital-signs blood pressure panel: no value of its own, two components."""
    return observation(
        oid,
        iso(2, 8),
        code="85354-9",
        category=[concept((None, "vital-signs"))],
        component=[
            {"code": concept((LOINC, "8480-6")), **quantity(systolic, unit="mmHg", code="mm[Hg]")},
            {"code": concept((LOINC, "8462-4")), **quantity(diastolic, unit="mmHg", code="mm[Hg]")},
        ],
    )


def test_panel_components_become_separate_lab_events() -> None:
    """A blood pressure panel gives one lab event per component, each with its value."""
    timeline = build(day_visit(), blood_pressure("bp", 120, 80))
    got = sorted((e.kind, e.code, e.value, e.unit, e.time) for e in timeline.events)
    assert got == [
        (EventKind.LAB, "LOINC|8462-4", 80.0, "mm[Hg]", utc(2, 8)),
        (EventKind.LAB, "LOINC|8480-6", 120.0, "mm[Hg]", utc(2, 8)),
    ]
    assert timeline.source.dropped == Counter()


def test_panel_with_one_bad_component_is_dropped_whole() -> None:
    """A panel is used whole or dropped whole, never half-kept and also counted."""
    timeline = build(day_visit(), blood_pressure("bp", 120, "eighty"))
    assert timeline.events == []
    assert timeline.source.dropped == Counter({"Observation:bad_value": 1})


def test_panel_without_any_coded_component_is_no_code() -> None:
    """Components with nothing usable leave the panel without a code."""
    panel = observation("bp", iso(2), component=[{"valueQuantity": {"value": 1}}])
    timeline = build(day_visit(), panel)
    assert timeline.source.dropped == Counter({"Observation:no_code": 1})


def test_observation_with_its_own_value_ignores_components() -> None:
    """A result with a valueQuantity is one event even when it lists components."""
    resource = observation(
        "o1",
        iso(2),
        component=[{"code": concept((LOINC, "x")), **quantity(1)}],
        **quantity(5.5, unit="mmol/L"),
    )
    [event] = build(day_visit(), resource).events
    assert (event.code, event.value, event.unit) == ("LOINC|2345-7", 5.5, "mmol/L")


def test_unit_is_taken_from_code_before_unit() -> None:
    """``code`` holds the UCUM unit; ``unit`` is display text used only when code is absent."""
    timeline = build(
        day_visit(),
        observation(
            "ucum",
            iso(2, 1),
            **quantity(
                98, unit="milligram per deciliter", code="mg/dL", system="http://unitsofmeasure.org"
            ),
        ),
        observation("text", iso(2, 2), **quantity(5.4, unit="mmol/L")),
    )
    assert [(e.value, e.unit) for e in timeline.events] == [(98.0, "mg/dL"), (5.4, "mmol/L")]


def test_value_without_unit_is_kept_with_unit_none() -> None:
    """A unitless number (a ratio, a count) is still a value."""
    [event] = build(day_visit(), observation("o1", iso(2), **quantity(7))).events
    assert (event.value, event.unit) == (7.0, None)
    assert isinstance(event.value, float)


def test_lab_without_numeric_value_keeps_its_bare_code() -> None:
    """valueString or no value at all: a lab event with value and unit None."""
    timeline = build(
        day_visit(),
        observation("text", iso(2, 1), valueString="positive"),
        observation("none", iso(2, 2)),
        observation("empty_q", iso(2, 3), valueQuantity={"unit": "mg"}),
    )
    assert [(e.value, e.unit) for e in timeline.events] == [(None, None)] * 3


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("12", id="string"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(float("-inf"), id="-inf"),
        pytest.param(True, id="bool"),
        pytest.param([1], id="list"),
        pytest.param({"v": 1}, id="object"),
        pytest.param(10**400, id="int_beyond_float"),
    ],
)
def test_bad_value_is_dropped(value: Any) -> None:
    """A value that is not a finite number drops the result rather than guessing."""
    timeline = build(day_visit(), observation("o1", iso(2), **quantity(value, unit="mg")))
    assert timeline.events == []
    assert timeline.source.dropped == Counter({"Observation:bad_value": 1})


def test_value_quantity_that_is_not_an_object_is_bad_value() -> None:
    """``valueQuantity: 5`` is malformed, not a unitless 5."""
    timeline = build(day_visit(), observation("o1", iso(2), valueQuantity=5))
    assert timeline.source.dropped == Counter({"Observation:bad_value": 1})


@pytest.mark.parametrize("unit", ["", "   ", 5, "x" * 65, "mg\n"])
def test_bad_unit_is_dropped(unit: Any) -> None:
    """Empty, non-string, absurdly long or non-printable units are counted as bad_unit."""
    timeline = build(day_visit(), observation("o1", iso(2), **quantity(1, code=unit)))
    assert timeline.source.dropped == Counter({"Observation:bad_unit": 1})


def test_unit_is_stripped() -> None:
    """Surrounding blanks are not part of a UCUM code."""
    [event] = build(day_visit(), observation("o1", iso(2), **quantity(1, code=" mg "))).events
    assert event.unit == "mg"


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "registered"])
def test_void_observations_are_dropped(status: str) -> None:
    """Results that were never produced, or were recorded in error, are not events."""
    timeline = build(day_visit(), observation("o1", iso(2), status=status))
    assert timeline.source.dropped == Counter({"Observation:not_performed": 1})


@pytest.mark.parametrize("status", ["not-done", "entered-in-error", "preparation"])
def test_void_procedures_are_dropped(status: str) -> None:
    """A procedure that did not happen is not an event."""
    timeline = build(day_visit(), procedure("pr1", iso(2), status=status))
    assert timeline.source.dropped == Counter({"Procedure:not_performed": 1})


def test_procedure_time_from_performed_period() -> None:
    """performedPeriod.start is used when there is no performedDateTime."""
    resource = procedure("pr1", iso(2))
    del resource["performedDateTime"]
    resource["performedPeriod"] = {"start": iso(2, 6), "end": iso(2, 7)}
    [event] = build(day_visit(), resource).events
    assert (event.kind, event.code, event.time) == (
        EventKind.PROCEDURE,
        "SNOMED|80146002",
        utc(2, 6),
    )


# --- codes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "name"),
    [
        ("http://loinc.org", "LOINC"),
        ("urn:oid:2.16.840.1.113883.6.1", "LOINC"),
        ("http://www.nlm.nih.gov/research/umls/rxnorm", "RXNORM"),
        ("http://snomed.info/sct", "SNOMED"),
        ("http://snomed.info/sct/", "SNOMED"),
        ("http://hl7.org/fhir/sid/icd-10-cm", "ICD10CM"),
        ("http://hl7.org/fhir/sid/icd-9-cm", "ICD9CM"),
        ("http://hl7.org/fhir/sid/icd-10-pcs", "ICD10PCS"),
        ("http://www.cms.gov/Medicare/Coding/ICD10", "ICD10PCS"),
        ("http://www.ama-assn.org/go/cpt", "CPT"),
        ("urn:oid:2.16.840.1.113883.6.12", "CPT"),
    ],
)
def test_code_system_mapping(system: str, name: str) -> None:
    """Known systems (URL or OID) shorten to one stable name in the event code."""
    [event] = build(day_visit(), observation("o1", iso(2), code=" 123 ", system=system)).events
    assert event.code == f"{name}|123"


def test_unknown_system_gets_a_stable_other_name() -> None:
    """An unknown system is OTHER:<8 hex of its URI>: stable across runs, distinct per URI."""
    local = "http://hospital.example/codes"
    first = build(day_visit(), observation("o1", iso(2), code="K1", system=local)).events[0]
    again = build(day_visit(), observation("o9", iso(2), code="K1", system=local)).events[0]
    other = build(day_visit(), observation("o1", iso(2), code="K1", system=local + "2")).events[0]
    assert re.fullmatch(r"OTHER:[0-9a-f]{8}\|K1", first.code)
    assert first.code == again.code == f"{short_system(local)}|K1"
    assert other.code != first.code
    assert short_system(None) == short_system("")  # a missing system is one bucket too


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (coded(observation("o1", iso(2)), concept((SNOMED, "s1"), (LOINC, "l1"))), "LOINC|l1"),
        (
            coded(procedure("pr1", iso(2)), concept((CPT, "c1"), (ICD10PCS, "p1"), (SNOMED, "s1"))),
            "SNOMED|s1",
        ),
        (coded(procedure("pr1", iso(2)), concept((CPT, "c1"), (ICD10PCS, "p1"))), "ICD10PCS|p1"),
        (
            med_request(
                "m1", iso(2), medicationCodeableConcept=concept((SNOMED, "s"), (RXNORM, "r"))
            ),
            "RXNORM|r",
        ),
        (
            coded(observation("o1", iso(2)), concept(("urn:a", "a1"), ("urn:b", "b1"))),
            f"{short_system('urn:a')}|a1",
        ),
    ],
)
def test_preferred_coding_wins_whatever_the_order(resource: JsonObject, expected: str) -> None:
    """Among several codings the preferred system wins; with none preferred, the first."""
    [event] = build(day_visit(), resource).events
    assert event.code == expected
    if not expected.startswith("OTHER:"):  # order-independent once a preferred system is in
        key = next(k for k in ("code", "medicationCodeableConcept") if k in resource)
        flipped = {**resource, key: {"coding": list(reversed(resource[key]["coding"]))}}
        assert build(day_visit(), flipped).events[0].code == expected


def test_codings_without_a_code_are_skipped() -> None:
    """A coding with a system but an empty code is not a concept."""
    code = {"coding": [{"system": LOINC, "code": ""}, {"system": SNOMED, "code": "s1"}]}
    [event] = build(day_visit(), coded(observation("o1", iso(2)), code)).events
    assert event.code == "SNOMED|s1"


@pytest.mark.parametrize("code", [None, {}, {"coding": []}, {"text": "glucose"}, "2345-7"])
def test_observation_without_a_usable_code_is_dropped(code: Any) -> None:
    """Text alone, or nothing, cannot become a token."""
    timeline = build(day_visit(), coded(observation("o1", iso(2)), code))
    assert timeline.source.dropped == Counter({"Observation:no_code": 1})


# --- conditions --------------------------------------------------------------------------


def test_conditions_are_labels_never_events() -> None:
    """A diagnosis goes to ``conditions`` only, attached to a visit by reference or time."""
    timeline = build(
        day_visit(),
        condition("c1", iso(2), encounter={"reference": "Encounter/e1"}),
        condition("c2", iso(2, 5), code="I10"),
        condition("c3", iso(20), code="J45"),  # outside every visit: kept, unattached
    )
    assert timeline.events == []
    assert [(c.code, c.visit_id) for c in timeline.conditions] == [
        ("ICD10CM|E11.9", "e1"),
        ("ICD10CM|I10", "e1"),
        ("ICD10CM|J45", None),
    ]
    assert timeline.source.dropped == Counter()


def test_condition_prefers_icd10cm_and_falls_back_to_recorded_date() -> None:
    """ICD-10-CM is the label system of choice; recordedDate times a condition with no onset."""
    resource = coded(condition("c1", iso(2)), concept((SNOMED, "44054006"), (ICD10CM, "E11.9")))
    del resource["onsetDateTime"]
    resource["recordedDate"] = iso(2, 9)
    [label] = build(day_visit(), resource).conditions
    assert (label.code, label.time) == ("ICD10CM|E11.9", utc(2, 9))


@pytest.mark.parametrize("verification", ["entered-in-error", "refuted"])
def test_refuted_or_erroneous_conditions_are_dropped(verification: str) -> None:
    """A diagnosis ruled out must not become a positive label."""
    status = concept(("http://terminology.hl7.org/CodeSystem/condition-ver-status", verification))
    timeline = build(day_visit(), condition("c1", iso(2), verificationStatus=status))
    assert timeline.conditions == []
    assert timeline.source.dropped == Counter({"Condition:not_performed": 1})


# --- duplicates, patient, dates, watermark -----------------------------------------------


@pytest.mark.parametrize("newest_first", [True, False])
def test_duplicates_keep_the_newest_last_updated(newest_first: bool) -> None:
    """Two copies of one resource: the newer meta.lastUpdated wins, whatever the order."""
    old = updated(observation("o1", iso(2), **quantity(1)), "2020-03-02T00:00:00Z")
    new = updated(observation("o1", iso(2), **quantity(2)), "2020-03-05T00:00:00Z")
    copies = (new, old) if newest_first else (old, new)
    timeline = build(day_visit(), *copies)
    assert [e.value for e in timeline.events] == [2.0]
    assert timeline.source.dropped == Counter({"Observation:duplicate": 1})
    assert timeline.source.resource_counts["Observation"] == 1


def test_duplicate_without_timestamp_loses_and_ties_go_to_the_later_copy() -> None:
    """A copy with no lastUpdated is oldest; equal timestamps keep the one read last."""
    stamped = updated(observation("o1", iso(2), **quantity(1)), "2020-03-02T00:00:00Z")
    bare = observation("o1", iso(2), **quantity(2))
    tie_a = updated(observation("o2", iso(2), code="x", **quantity(3)), "2020-03-02T00:00:00Z")
    tie_b = updated(observation("o2", iso(2), code="x", **quantity(4)), "2020-03-02T00:00:00Z")
    timeline = build(day_visit(), stamped, bare, tie_a, tie_b)
    assert sorted(e.value or 0 for e in timeline.events) == [1.0, 4.0]
    assert timeline.source.dropped == Counter({"Observation:duplicate": 2})


def test_same_id_in_different_types_is_not_a_duplicate() -> None:
    """Ids are unique per resource type only."""
    timeline = build(day_visit(), observation("x", iso(2)), procedure("x", iso(2)))
    assert len(timeline.events) == 2


def test_patient_demographics_and_deceased_date_time() -> None:
    """birthDate, gender and deceasedDateTime fill the Patient."""
    timeline = build(
        the_patient=patient(
            birthDate="1950-06-01", gender="female", deceasedDateTime="2020-03-04T05:06:07+01:00"
        ),
    )
    assert timeline.patient.id == "p1"
    assert timeline.patient.birth_date == date(1950, 6, 1)
    assert timeline.patient.sex == "female"
    assert timeline.patient.deceased is True
    assert timeline.patient.deceased_at == datetime(2020, 3, 4, 4, 6, 7, tzinfo=UTC)


@pytest.mark.parametrize(("flag", "deceased"), [(True, True), (False, False), (None, False)])
def test_patient_deceased_boolean(flag: bool | None, deceased: bool) -> None:
    """deceasedBoolean true means deceased with no known time."""
    extra = {} if flag is None else {"deceasedBoolean": flag}
    timeline = build(the_patient=patient(**extra))
    assert (timeline.patient.deceased, timeline.patient.deceased_at) == (deceased, None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2012", datetime(2012, 1, 1, tzinfo=UTC)),
        ("2012-08", datetime(2012, 8, 1, tzinfo=UTC)),
        ("2012-08-15", datetime(2012, 8, 15, tzinfo=UTC)),
        ("2012-08-15T10:30:00", datetime(2012, 8, 15, 10, 30, tzinfo=UTC)),  # naive = UTC
        ("2012-08-15T10:30:00Z", datetime(2012, 8, 15, 10, 30, tzinfo=UTC)),
        ("2012-08-15T10:30:00+02:00", datetime(2012, 8, 15, 8, 30, tzinfo=UTC)),
        ("2012-08-15T10:30:00.123-05:00", datetime(2012, 8, 15, 15, 30, 0, 123000, tzinfo=UTC)),
    ],
)
def test_event_dates_partial_naive_and_zoned(raw: str, expected: datetime) -> None:
    """Partial dates start their period; naive date-times are read as UTC; all come out UTC."""
    timeline = build(encounter("e1", "2000", "2030"), observation("o1", raw))
    [event] = timeline.events
    assert event.time == expected
    assert event.time.tzinfo is UTC


@pytest.mark.parametrize(
    "raw", ["yesterday", "2012-13", "2012-02-30", "12/08/2012", "2012-08-15T25:00:00", 2012, ""]
)
def test_unparsable_dates_are_counted(raw: Any) -> None:
    """A date that does not parse drops the resource as unparsable_date."""
    timeline = build(encounter("e1", "2000", "2030"), observation("o1", raw))
    assert timeline.events == []
    assert timeline.source.dropped == Counter({"Observation:unparsable_date": 1})


def test_missing_date_is_no_time() -> None:
    """No time field at all is a different reason from a time that does not parse."""
    timeline = build(encounter("e1", "2000", "2030"), observation("o1", None))
    assert timeline.source.dropped == Counter({"Observation:no_time": 1})


def test_later_time_field_used_when_the_first_does_not_parse() -> None:
    """An unparsable effectiveDateTime falls back to ``issued``."""
    resource = observation("o1", "garbage", issued="2020-03-02T04:00:00Z")
    [event] = build(day_visit(), resource).events
    assert event.time == utc(2, 4)


def test_watermark_is_the_newest_last_updated_and_types_are_counted() -> None:
    """SourceFacts.last_updated is the newest meta.lastUpdated of any resource read."""
    timeline = build(
        updated(day_visit(), "2021-01-01T00:00:00Z"),
        updated(observation("o1", iso(2)), "2021-06-01T12:00:00+02:00"),
        updated(procedure("pr1", iso(2)), "2021-03-01"),
        observation("o2", iso(2)),  # no meta: does not move the watermark
        the_patient=updated(patient(), "2020-12-31T00:00:00Z"),
    )
    assert timeline.source.last_updated == datetime(2021, 6, 1, 10, tzinfo=UTC)
    assert timeline.source.resource_counts == Counter(
        {"Patient": 1, "Encounter": 1, "Observation": 2, "Procedure": 1}
    )
    assert timeline.source.source == "test"


def test_watermark_counts_dropped_resources_too() -> None:
    """A resource read but unusable was still seen: the next fetch must not ask for it again."""
    timeline = build(updated(observation("o1", None), "2022-01-01T00:00:00Z"))
    assert timeline.source.last_updated == datetime(2022, 1, 1, tzinfo=UTC)
    assert timeline.source.dropped == Counter({"Observation:no_time": 1})


def test_events_are_sorted_by_time() -> None:
    """Events come out in time order, whatever order the resources were read in."""
    timeline = build(
        day_visit(),
        observation("o3", iso(3)),
        procedure("pr1", iso(1, 5)),
        observation("o1", iso(2)),
        med_request("m1", iso(1, 1), medicationCodeableConcept=concept((RXNORM, "1"))),
    )
    times = [e.time for e in timeline.events]
    assert times == sorted(times)
    assert [e.kind for e in timeline.events] == [
        EventKind.MEDICATION,
        EventKind.PROCEDURE,
        EventKind.LAB,
        EventKind.LAB,
    ]


def test_record_level_drops_are_carried_into_the_timeline() -> None:
    """Drops the reader counted before normalisation end up in SourceFacts.dropped."""
    record = PatientRecord("p1", patient(), [], "test", dropped=Counter({"Patient:duplicate": 1}))
    assert build_timeline(record).source.dropped == Counter({"Patient:duplicate": 1})


def test_unsupported_resource_type_in_a_record_is_counted() -> None:
    """A type the normaliser has no reader for is counted, not silently ignored."""
    timeline = build({"resourceType": "DiagnosticReport", "id": "d1"})
    assert timeline.source.dropped == Counter({"DiagnosticReport:unsupported_type": 1})


def test_record_without_patient_resource_is_refused() -> None:
    """The caller counts patients without a Patient resource; build_timeline refuses them."""
    with pytest.raises(ValueError, match="no Patient"):
        build_timeline(PatientRecord("p1", None, [], "test"))
