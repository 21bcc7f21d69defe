"""Code systems: long FHIR system URIs to the short stable names tokens carry.

A token reads ``LOINC|2345-7`` rather than ``http://loinc.org|2345-7`` so that the same
concept coded by two servers (one using the URL, one the HL7 OID) gets one token. A
system we do not know keeps a stable name derived from its URI (``OTHER:<8 hex>``), so
it never collides with a known one and never depends on run order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

SYSTEMS: dict[str, str] = {
    "http://loinc.org": "LOINC",
    "urn:oid:2.16.840.1.113883.6.1": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "urn:oid:2.16.840.1.113883.6.88": "RXNORM",
    "http://snomed.info/sct": "SNOMED",
    "urn:oid:2.16.840.1.113883.6.96": "SNOMED",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "urn:oid:2.16.840.1.113883.6.90": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://hl7.org/fhir/sid/icd-9-cm/diagnosis": "ICD9CM",
    "urn:oid:2.16.840.1.113883.6.103": "ICD9CM",
    "http://www.cms.gov/Medicare/Coding/ICD10": "ICD10PCS",
    "http://hl7.org/fhir/sid/icd-10-pcs": "ICD10PCS",
    "urn:oid:2.16.840.1.113883.6.4": "ICD10PCS",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "urn:oid:2.16.840.1.113883.6.12": "CPT",
}

# Preferred systems per use, most preferred first: when a concept carries several codings,
# the first match wins, so the choice does not depend on the order the server lists them.
PROCEDURE_SYSTEMS = ("SNOMED", "ICD10PCS", "CPT", "ICD9CM")
MEDICATION_SYSTEMS = ("RXNORM", "SNOMED")
LAB_SYSTEMS = ("LOINC", "SNOMED")
CONDITION_SYSTEMS = ("ICD10CM", "ICD9CM", "SNOMED")


def short_system(system: str | None) -> str:
    """The short name of a code system URI; unknown or missing systems get ``OTHER:<hash>``."""
    uri = (system or "").strip()
    known = SYSTEMS.get(uri) or SYSTEMS.get(uri.rstrip("/"))
    if known:
        return known
    return "OTHER:" + hashlib.sha1(uri.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def pick_code(concept: Any, preferred: Sequence[str]) -> str | None:
    """``SYSTEM|CODE`` for a CodeableConcept, or None when it holds no usable code.

    A coding in a preferred system wins (in the order given); otherwise the first coding
    that has a code, under its short (possibly ``OTHER:``) system name.
    """
    if not isinstance(concept, dict):
        return None
    candidates = list(_codings(concept.get("coding")))
    if not candidates:
        return None
    for name in preferred:
        for system, code in candidates:
            if system == name:
                return f"{system}|{code}"
    system, code = candidates[0]
    return f"{system}|{code}"


def _codings(codings: Any) -> Iterable[tuple[str, str]]:
    if not isinstance(codings, list):
        return
    for coding in codings:
        if not isinstance(coding, dict):
            continue
        code = coding.get("code")
        if isinstance(code, str) and code.strip():
            system = coding.get("system")
            yield short_system(system if isinstance(system, str) else None), code.strip()
