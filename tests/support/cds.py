"""What a CDS client (an EHR) sends: hook bodies and prefetch read from its FHIR server."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import httpx

from fhir_adapter.record import JsonObject
from service.cds.services import PATIENT_TOKEN, PREFETCH

Prefetch = dict[str, JsonObject | None]


def hook_body(
    patient_id: str, prefetch: Prefetch, server: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """A patient-view call as an EHR sends it."""
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid4()),
        "context": {"userId": "Practitioner/example", "patientId": patient_id},
        "prefetch": prefetch,
    }
    if server is not None:
        body["fhirServer"] = server
    if token is not None:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/*.read",
            "subject": "ehrmamba",
        }
    return body


async def prefetch_from(base: str, patient_id: str, page: int | None = None) -> Prefetch:
    """What an EHR sends: every template run against its FHIR server, each search whole in
    one Bundle, or (``page``) only its first page of that many entries."""
    prefetch: Prefetch = {}
    async with httpx.AsyncClient(headers={"Accept": "application/fhir+json"}) as http:
        for query in PREFETCH:
            url = f"{base}/{query.template.replace(PATIENT_TOKEN, patient_id)}"
            if not query.is_read:
                url += f"&_count={page or 1000}"
            response = await http.get(url)
            response.raise_for_status()
            result = response.json()
            following = result
            while page is None and (link := next_link(following)):
                following = (await http.get(link)).raise_for_status().json()
                result["entry"] += following["entry"]
            if page is None:
                result["link"] = [x for x in result.get("link", []) if x["relation"] == "self"]
            prefetch[query.key] = result
    return prefetch


def next_link(value: JsonObject | None) -> str | None:
    links = (value or {}).get("link") or []
    return next((str(x["url"]) for x in links if x.get("relation") == "next"), None)
