"""The demo's EHR, the CDS client the service trusts: a signing key made once and kept in
``.cache/demo``, and a patient-view call. Each call signs a new JWT, because a token is
good for five minutes and one call, so no printed ``curl`` line could be run twice."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx

from service.cds.client_token import ClientKey, sign_client_token
from service.settings import CdsIssuer

ISSUER = "https://demo-ehr.invalid"
PATIENT_VIEW = "ehrmamba-patient-view"
_KID = "ehrmamba-demo-ehr"


def ehr_key(cache: Path) -> ClientKey:
    """The EHR's private key, made on first use (readable by its owner only)."""
    pem = cache / "ehr-key.pem"
    if not pem.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / "ehr-key.pem.partial"
        partial.touch(mode=0o600)
        partial.write_bytes(ClientKey.generate("ES384", _KID).private_pem())
        partial.replace(pem)
    return ClientKey.from_pem(pem.read_bytes(), _KID)


def ehr_issuer(cache: Path) -> CdsIssuer:
    """The service's view of the EHR: its issuer and public key set, written beside it."""
    jwks = cache / "ehr-jwks.json"
    jwks.write_text(json.dumps(ehr_key(cache).public_jwks()))
    return CdsIssuer(iss=ISSUER, jwks_file=jwks)


def call_patient_view(
    service: str, fhir_server: str, key: ClientKey, patient_id: str
) -> httpx.Response:
    """Open a chart as the EHR does: no prefetch, so the service reads ``fhir_server``."""
    url = f"{service}/cds-services/{PATIENT_VIEW}"
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_server,
        "context": {"userId": "Practitioner/demo", "patientId": patient_id},
    }
    token = sign_client_token(key, ISSUER, url)
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
