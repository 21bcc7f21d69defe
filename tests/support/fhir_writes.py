"""Writes to the test FHIR server: new data for a patient, and its removal afterwards."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fhir_adapter.client import FhirClient


def new_visit(patient: str, tag: str, start: datetime) -> list[dict[str, Any]]:
    """An outpatient visit with one creatinine result: data that extends a record."""
    encounter = {
        "resourceType": "Encounter", "id": f"enc-{tag}", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                  "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": start.isoformat(),
                   "end": (start + timedelta(hours=1)).isoformat()},
    }  # fmt: skip
    lab = {
        "resourceType": "Observation", "id": f"obs-{tag}", "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "encounter": {"reference": f"Encounter/enc-{tag}"},
        "effectiveDateTime": (start + timedelta(minutes=20)).isoformat(),
        "valueQuantity": {"value": 2.9, "unit": "mg/dL", "code": "mg/dL"},
    }  # fmt: skip
    return [encounter, lab]


async def put_resources(fhir: FhirClient, resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        await fhir.request("PUT", f"{resource['resourceType']}/{resource['id']}", json=resource)


async def delete_resources(fhir: FhirClient, resources: list[dict[str, Any]]) -> None:
    for resource in reversed(resources):
        path = f"{resource['resourceType']}/{resource['id']}"
        await fhir.request("DELETE", path, expect=frozenset({200, 204}))
