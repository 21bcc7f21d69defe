"""Display names: taken from the very coding the normaliser chose, else the concept's text,
and gathered over a dataset's training patients for the artifact."""

from __future__ import annotations

from fhir_adapter.codes import pick_code, pick_display
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord


def test_the_display_of_the_chosen_coding_wins() -> None:
    concept = {
        "coding": [
            {"system": "http://snomed.info/sct", "code": "1", "display": "SNOMED name"},
            {"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"},
        ],
        "text": "creat",
    }
    code = pick_code(concept, ("LOINC",))
    assert code == "LOINC|2160-0"
    assert pick_display(concept, code) == "Creatinine"
    assert pick_display({"coding": concept["coding"][:1], "text": "creat"}, code) == "creat"
    assert pick_display({"coding": [{"code": "x"}]}, "OTHER|x") is None
    assert pick_display("not a concept", code) is None


def test_a_timeline_remembers_how_its_source_named_each_event_code() -> None:
    patient = {"resourceType": "Patient", "id": "p", "birthDate": "1950-01-01"}
    encounter = {
        "resourceType": "Encounter", "id": "e", "status": "finished",
        "class": {"code": "IMP"}, "subject": {"reference": "Patient/p"},
        "period": {"start": "2024-01-01T00:00:00Z", "end": "2024-01-03T00:00:00Z"},
    }  # fmt: skip
    lab = {
        "resourceType": "Observation", "id": "o", "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0",
                             "display": "Creatinine"}]},
        "subject": {"reference": "Patient/p"}, "encounter": {"reference": "Encounter/e"},
        "effectiveDateTime": "2024-01-02T00:00:00Z",
        "valueQuantity": {"value": 1.1, "unit": "mg/dL"},
    }  # fmt: skip
    timeline = build_timeline(PatientRecord("p", patient, [encounter, lab], "test"))
    assert [e.code for e in timeline.events] == ["LOINC|2160-0"]
    assert timeline.source.displays == {"LOINC|2160-0": "Creatinine"}
