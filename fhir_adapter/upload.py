"""Loading resources into a FHIR server with their ids kept (PUT, not POST).

POST lets the server pick new ids, so a patient loaded from a file could no longer be
compared with, or found under, its id in that file. Transactions of ``PUT Type/id``
keep ids, which the seed loaders (tests, demo, HAPI in compose) all rely on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fhir_adapter.client import FhirClient
from fhir_adapter.record import JsonObject, PatientRecord


def put_transactions(resources: Iterable[JsonObject], size: int = 500) -> Iterator[JsonObject]:
    """Transaction Bundles of at most ``size`` ``PUT Type/id`` entries each."""
    entries: list[JsonObject] = []
    for resource in resources:
        rtype, rid = resource["resourceType"], resource["id"]
        entries.append(
            {
                "fullUrl": f"{rtype}/{rid}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"{rtype}/{rid}"},
            }
        )
        if len(entries) >= size:
            yield {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            entries = []
    if entries:
        yield {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def upload_record(client: FhirClient, record: PatientRecord, size: int = 500) -> int:
    """PUT a patient's resources (Patient first, then referenced Medications); returns count."""
    resources = [
        *([record.patient] if record.patient else []),
        *record.medications.values(),
        *record.resources,
    ]
    for bundle in put_transactions(resources, size):
        await client.transaction(bundle)
    return len(resources)
