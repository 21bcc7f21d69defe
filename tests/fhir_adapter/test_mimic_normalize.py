"""The MIMIC-IV on FHIR rules of the adapter, each pinned on a few hand-built resources.

MIMIC's export differs from a Bulk Data export in four ways the adapter must absorb: its
files are named after profiles, its code systems are its own even for ICD, a hospital
admission is known by its identifier rather than its class, and its diagnoses carry no time.
tests/training/test_mimic.py runs the same rules end to end on a generated folder.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.codes import MIMIC_BASES, short_system
from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from fhir_adapter.timeline import Timeline, VisitClass

JsonObject = dict[str, Any]

NEW, OLD = MIMIC_BASES  # the guide's canonical base, and the ETL's earlier one
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def admission(eid: str, start: str, end: str, **extra: Any) -> JsonObject:
    """A MIMIC hospital admission of p1, ELECTIVE (class AMB once the ETL maps it)."""
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "identifier": [{"system": f"{NEW}/identifier/encounter-hosp", "value": "20000001"}],
        "class": {"system": ACT_CODE, "code": "AMB"},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": start, "end": end},
        **extra,
    }


def diagnosis(rid: str, code: str, eid: str | None, base: str = NEW) -> JsonObject:
    """A MIMIC Condition of p1: an ICD-10 code without dots and no time of its own."""
    resource: JsonObject = {
        "resourceType": "Condition",
        "id": rid,
        "code": {"coding": [{"system": f"{base}/CodeSystem/mimic-diagnosis-icd10", "code": code}]},
        "subject": {"reference": "Patient/p1"},
    }
    if eid is not None:
        resource["encounter"] = {"reference": f"Encounter/{eid}"}
    return resource


def build(*resources: JsonObject, medications: dict[str, JsonObject] | None = None) -> Timeline:
    return build_timeline(
        PatientRecord(
            patient_id="p1",
            patient={"resourceType": "Patient", "id": "p1", "birthDate": "2100-01-01"},
            resources=list(resources),
            source="test",
            medications=medications or {},
        )
    )


@pytest.mark.parametrize("base", MIMIC_BASES)
@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("mimic-diagnosis-icd9", "ICD9CM"),
        ("mimic-diagnosis-icd10", "ICD10CM"),
        ("mimic-procedure-icd9", "ICD9CM"),
        ("mimic-procedure-icd10", "ICD10PCS"),
        ("mimic-d-labitems", "MIMIC-LAB"),
        ("mimic-medication-ndc", "MIMIC-NDC"),
        ("mimic-medication-gsn", "MIMIC-GSN"),
        ("mimic-medication-formulary-drug-cd", "MIMIC-FORMULARY"),
        ("mimic-medication-name", "MIMIC-MED-NAME"),
        ("mimic-medication-icu", "MIMIC-MED-ICU"),
    ],
)
def test_mimic_code_systems_have_stable_short_names(base: str, name: str, short: str) -> None:
    """Both bases the ETL has used give one name; ICD keeps the standard names."""
    assert short_system(f"{base}/CodeSystem/{name}") == short


def test_an_admission_is_inpatient_whatever_its_class() -> None:
    """ELECTIVE maps to AMB and observation to OBSENC, yet both are hospital admissions; an
    ED stay (class EMER, identifier encounter-ed) stays emergency, OBSENC alone emergency."""
    ed = {
        **admission("ed1", "2150-01-10T08:00:00-05:00", "2150-01-10T12:00:00-05:00"),
        "identifier": [{"system": f"{NEW}/identifier/encounter-ed", "value": "30000001"}],
        "class": {"system": ACT_CODE, "code": "EMER"},
    }
    observation = {**admission("o1", "2150-02-01T08:00:00-05:00", "2150-02-02T08:00:00-05:00")}
    observation["class"] = {"system": ACT_CODE, "code": "OBSENC"}
    plain_obsenc = {**observation, "id": "o2", "identifier": [], "period": {
        "start": "2150-03-01T08:00:00-05:00", "end": "2150-03-01T20:00:00-05:00"}}  # fmt: skip
    old_style = {
        **admission("a2", "2150-04-01T08:00:00-05:00", "2150-04-03T08:00:00-05:00"),
        "identifier": [{"system": f"{OLD}/identifier/encounter", "value": "20000002"}],
    }
    timeline = build(
        admission("a1", "2150-01-01T08:00:00-05:00", "2150-01-05T08:00:00-05:00"),
        ed,
        observation,
        plain_obsenc,
        old_style,
    )
    assert [(v.id, v.visit_class) for v in timeline.visits] == [
        ("a1", VisitClass.INPATIENT),
        ("ed1", VisitClass.EMERGENCY),
        ("o1", VisitClass.INPATIENT),
        ("o2", VisitClass.EMERGENCY),
        ("a2", VisitClass.INPATIENT),
    ]


def test_admission_type_written_as_the_class_is_inpatient() -> None:
    """An export that copies admission_type into the class (EW EMER.) is read the same."""
    resource = admission("a1", "2150-01-01T08:00:00-05:00", "2150-01-05T08:00:00-05:00")
    resource["identifier"] = []
    resource["class"] = {"system": f"{NEW}/CodeSystem/mimic-admission-class", "code": "EW EMER."}
    [visit] = build(resource).visits
    assert visit.visit_class is VisitClass.INPATIENT


def test_a_hostile_identifier_is_ignored() -> None:
    """Identifiers that are not a list of objects cannot make an encounter an admission."""
    hostile = (
        "x",
        [1, None, {"system": 3}, {"system": [1]}],
        {"system": f"{OLD}/identifier/encounter"},
    )
    for identifier in hostile:
        resource = admission("a1", "2150-01-01T08:00:00-05:00", "2150-01-02T08:00:00-05:00")
        [visit] = build({**resource, "identifier": identifier}).visits
        assert visit.visit_class is VisitClass.AMBULATORY


def test_an_untimed_diagnosis_takes_the_end_of_its_encounter() -> None:
    """A billing code is known once the stay is over; without an encounter it has no time."""
    timeline = build(
        admission("a1", "2150-01-01T08:00:00-05:00", "2150-01-05T08:00:00-05:00"),
        diagnosis("c1", "I10", "a1"),
        diagnosis("c2", "E785", "a1", base=OLD),
        diagnosis("c3", "J189", None),
        diagnosis("c4", "N179", "gone"),
    )
    end = datetime(2150, 1, 5, 13, tzinfo=UTC)
    assert [(c.code, c.time, c.visit_id) for c in timeline.conditions] == [
        ("ICD10CM|E785", end, "a1"),
        ("ICD10CM|I10", end, "a1"),
    ]
    assert timeline.source.dropped == Counter({"Condition:no_time": 2})


def test_a_request_without_authored_on_is_timed_by_its_validity() -> None:
    """MIMIC leaves authoredOn out where the pharmacy row is missing."""
    medication = {
        "resourceType": "Medication",
        "id": "m1",
        "code": {"coding": [{"system": f"{NEW}/CodeSystem/mimic-medication-ndc", "code": "1"}]},
    }
    request = {
        "resourceType": "MedicationRequest",
        "id": "r1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/a1"},
        "medicationReference": {"reference": "Medication/m1"},
        "dispenseRequest": {"validityPeriod": {"start": "2150-01-02T10:00:00-05:00"}},
    }
    timeline = build(
        admission("a1", "2150-01-01T08:00:00-05:00", "2150-01-05T08:00:00-05:00"),
        request,
        medications={"Medication/m1": medication},
    )
    [event] = timeline.events
    assert (event.code, event.time) == ("MIMIC-NDC|1", datetime(2150, 1, 2, 15, tzinfo=UTC))


def _write(path: Path, *resources: JsonObject) -> None:
    path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in resources)))


def test_profile_named_files_are_read_by_their_content(tmp_path: Path) -> None:
    """MimicPatient is not an unread type called 'MimicPatient'; chartevents are skipped
    unparsed by name, and a Bulk file of an unread type still is too."""
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "2100-01-01"}
    _write(tmp_path / "MimicPatient.ndjson.gz", patient)
    _write(
        tmp_path / "MimicEncounterICU.ndjson.gz",
        admission("a1", "2150-01-01T08:00:00-05:00", "2150-01-05T08:00:00-05:00"),
    )
    _write(tmp_path / "MimicCondition.ndjson.gz", diagnosis("c1", "I10", "a1"))
    _write(tmp_path / "MimicObservationChartevents.ndjson.gz", {"not": "parsed"}, {})
    _write(tmp_path / "Device.ndjson.gz", {"resourceType": "Device", "id": "d1"})
    reader = ExportReader(tmp_path)
    [record] = list(reader.records())
    timeline = build_timeline(record)
    assert [c.code for c in timeline.conditions] == ["ICD10CM|I10"]
    assert reader.stats.skipped_types == Counter({"MimicObservationChartevents": 2, "Device": 1})
    assert reader.stats.dropped == Counter()
