"""The CDS Hooks services this model offers, as data, and the discovery document
(``GET /cds-services``, CDS Hooks 2.0 "Discovery").

One service per hook, with id ``ehrmamba-<hook>``: the hook in the id tells an EHR analyst
which registration is which, and a client that replaces a service's earlier cards when the
same id fires again ("update stale guidance") then only replaces that hook's cards.

Every service asks for the same prefetch: the whole record the model reads, because any
task's score depends on all of it. The searches are exactly the ones ``FhirClient.
fetch_patient`` runs, so prefetched data and data fetched from ``fhirServer`` are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fhir_adapter.record import CLINICAL_TYPES, MEDICATION_TYPES
from model.tasks import Task
from service.cds.models import Discovery, Hook, ServiceDescription

PATIENT_TOKEN = "{{context.patientId}}"

TASK_TITLES: dict[Task, str] = {
    Task.MORTALITY: "Death in hospital or within 32 days of discharge",
    Task.LENGTH_OF_STAY: "Hospital stay longer than 7 days",
    Task.READMISSION: "30-day readmission",
    Task.HYPERTENSION: "Hypertension",
    Task.FLUID_ELECTROLYTE: "Fluid, electrolyte and acid-base disorders",
    Task.LIPID_METABOLISM: "Lipid metabolism disorders",
}


@dataclass(frozen=True)
class PrefetchQuery:
    """One prefetch template: a read of the Patient, or a search of one clinical type by
    patient (with the Medications that medication resources reference)."""

    key: str
    resource_type: str
    include: str | None = None

    @property
    def is_read(self) -> bool:
        return self.resource_type == "Patient"

    @property
    def template(self) -> str:
        if self.is_read:
            return f"Patient/{PATIENT_TOKEN}"
        query = f"{self.resource_type}?patient={PATIENT_TOKEN}"
        return f"{query}&_include={self.include}" if self.include else query

    def search_params(self, patient_id: str) -> dict[str, str]:
        """The template's search parameters for one patient, for ``FhirClient.search``."""
        params = {"patient": patient_id}
        if self.include:
            params["_include"] = self.include
        return params


def _search(resource_type: str) -> PrefetchQuery:
    key = resource_type[0].lower() + resource_type[1:] + "s"  # Encounter -> encounters
    include = f"{resource_type}:medication" if resource_type in MEDICATION_TYPES else None
    return PrefetchQuery(key, resource_type, include)


PREFETCH: tuple[PrefetchQuery, ...] = (
    PrefetchQuery("patient", "Patient"),
    *(_search(t) for t in CLINICAL_TYPES),
)

_USAGE = (
    "Needs the patient's whole record: every prefetch key, or a fhirServer on this "
    "service's allow-list (with fhirAuthorization if it needs a token) that grants read "
    "access to Patient, Encounter, Procedure, MedicationRequest, MedicationAdministration, "
    "Medication, Observation and Condition. Without either the call is answered 412. "
    "Trained on synthetic patients only: validate locally before clinical use."
)


@dataclass(frozen=True)
class CdsService:
    id: str
    hook: Hook
    title: str
    description: str
    tasks: tuple[Task, ...]

    def offered(self, served: Sequence[Task]) -> tuple[Task, ...]:
        """This service's tasks that the loaded model serves, in the service's order."""
        return tuple(t for t in self.tasks if t in served)


SERVICES: tuple[CdsService, ...] = (
    CdsService(
        id="ehrmamba-patient-view",
        hook="patient-view",
        title="EHRMamba risk scores",
        description="When a chart is opened, flags moderate or high risks the model "
        "estimates from the patient's FHIR record.",
        tasks=tuple(Task),
    ),
    CdsService(
        id="ehrmamba-encounter-start",
        hook="encounter-start",
        title="EHRMamba admission risks",
        description="When an encounter starts, flags a moderate or high risk of death in "
        "hospital or of a stay longer than 7 days.",
        tasks=(Task.MORTALITY, Task.LENGTH_OF_STAY),
    ),
    CdsService(
        id="ehrmamba-encounter-discharge",
        hook="encounter-discharge",
        title="EHRMamba readmission risk",
        description="At discharge, flags a moderate or high risk of readmission or an "
        "emergency visit within 30 days.",
        tasks=(Task.READMISSION,),
    ),
)


def discovery(services: Sequence[CdsService], served_tasks: Sequence[Task]) -> dict[str, Any]:
    """The ``GET /cds-services`` body: the services with at least one task the loaded model
    serves, each describing only those tasks (a model trained without a task never
    advertises it)."""
    described = [
        ServiceDescription(
            hook=service.hook,
            title=service.title,
            description=f"{service.description} Scores: "
            f"{'; '.join(TASK_TITLES[t] for t in offered)}.",
            id=service.id,
            prefetch={query.key: query.template for query in PREFETCH},
            usage_requirements=_USAGE,
        )
        for service in services
        if (offered := service.offered(served_tasks))
    ]
    return Discovery(services=described).model_dump(mode="json", by_alias=True)
