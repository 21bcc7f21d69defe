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

# MIMIC-IV on FHIR (the MIMIC Implementation Guide, https://mimic.mit.edu/fhir) defines its own
# code systems even where the codes are standard. The guide's canonical base is the first;
# earlier versions of its ETL (github.com/kind-lab/mimic-fhir) wrote the second, so both are
# read. ICD codes come without dots (4019, I10, 0DTJ4ZZ), exactly as in MIMIC's tables.
MIMIC_BASES = ("http://mimic.mit.edu/fhir/mimic", "http://fhir.mimic.mit.edu")
_MIMIC_CODE_SYSTEMS: dict[str, str] = {
    # Standard terminologies under MIMIC URIs: the same short names as the HL7 URIs, so the
    # condition code sets and procedure tokens treat MIMIC exactly like any other source.
    "mimic-diagnosis-icd9": "ICD9CM",
    "mimic-diagnosis-icd10": "ICD10CM",
    "mimic-procedure-icd9": "ICD9CM",  # ICD-9-CM volume 3, as PROCEDURE_SYSTEMS reads it
    "mimic-procedure-icd10": "ICD10PCS",
    "procedure-icd9": "ICD9CM",  # the ETL's earlier names for the two procedure systems
    "procedure-icd10": "ICD10PCS",
    # MIMIC's local dictionaries: readable names so a token says where it came from.
    "mimic-d-labitems": "MIMIC-LAB",  # hosp.d_labitems itemid (creatinine is 50912)
    "mimic-d-items": "MIMIC-ITEM",  # icu.d_items itemid (procedureevents, outputevents)
    "mimic-chartevents-d-items": "MIMIC-CHART",
    "mimic-medication-ndc": "MIMIC-NDC",
    "mimic-medication-gsn": "MIMIC-GSN",
    "mimic-medication-formulary-drug-cd": "MIMIC-FORMULARY",
    "mimic-medication-name": "MIMIC-MED-NAME",
    "mimic-medication-icu": "MIMIC-MED-ICU",  # icu.d_items itemid of inputevents
    "mimic-medication-poe-iv": "MIMIC-POE-IV",
    "mimic-medication-mix": "MIMIC-MED-MIX",
    "mimic-hcpcs-cd": "MIMIC-HCPCS",
}
SYSTEMS.update(
    {
        f"{base}/CodeSystem/{name}": short
        for base in MIMIC_BASES
        for name, short in _MIMIC_CODE_SYSTEMS.items()
    }
)

# A MIMIC hospital admission (a row of hosp.admissions) is told apart from the ED and ICU
# stays of the same export by its identifier system, not by Encounter.class: the ETL copies
# or maps admission_type into the class (ELECTIVE became AMB, EW EMER. became EMER), which
# says how the patient came in, not that the patient was admitted.
MIMIC_ADMISSION_IDENTIFIERS = frozenset(
    f"{base}/identifier/{name}" for base in MIMIC_BASES for name in ("encounter-hosp", "encounter")
)
# The class system that carries admission_type verbatim (EW EMER., URGENT, ELECTIVE, ...).
MIMIC_ADMISSION_CLASS_SYSTEMS = frozenset(
    f"{base}/CodeSystem/{name}"
    for base in MIMIC_BASES
    for name in ("mimic-admission-class", "admission-class")
)

# Preferred systems per use, most preferred first: when a concept carries several codings,
# the first match wins, so the choice does not depend on the order the server lists them.
# Standard terminologies come before MIMIC's local ones; among MIMIC's medication systems the
# national codes (NDC, then First Databank's GSN) come before the hospital's formulary code and
# the free-text drug name, the same order the MIMIC ETL uses to pick a Medication's code.
PROCEDURE_SYSTEMS = ("SNOMED", "ICD10PCS", "CPT", "ICD9CM", "MIMIC-ITEM")
MEDICATION_SYSTEMS = (
    "RXNORM",
    "SNOMED",
    "MIMIC-NDC",
    "MIMIC-GSN",
    "MIMIC-FORMULARY",
    "MIMIC-MED-NAME",
    "MIMIC-MED-ICU",
    "MIMIC-POE-IV",
    "MIMIC-MED-MIX",
)
LAB_SYSTEMS = ("LOINC", "SNOMED", "MIMIC-LAB")
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


def pick_display(concept: Any, code: str) -> str | None:
    """How the source names ``code`` (``SYSTEM|CODE`` from ``pick_code``): that coding's
    ``display``, else the concept's ``text``; None when neither is given."""
    if not isinstance(concept, dict):
        return None
    codings = concept.get("coding")
    for coding in codings if isinstance(codings, list) else []:
        if not isinstance(coding, dict):
            continue
        system, raw = coding.get("system"), coding.get("code")
        if not isinstance(raw, str) or not raw.strip():
            continue
        short = short_system(system if isinstance(system, str) else None)
        display = coding.get("display")
        if f"{short}|{raw.strip()}" == code and isinstance(display, str) and display.strip():
            return display.strip()
    text = concept.get("text")
    return text.strip() if isinstance(text, str) and text.strip() else None


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
