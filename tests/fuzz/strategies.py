"""Hypothesis strategies for hostile FHIR: resources whose every field may hold the right
shape, a wrong JSON type, an absurd number, a NaN-like or unicode-heavy string, or a deep
nest. Shared by the adapter fuzzing and the CDS prefetch fuzzing through the service, so
both see the same kinds of garbage.

Values stay JSON-like (what ``json.loads`` can return, NaN and Infinity included, since the
FHIR client parses server answers with the standard library, which accepts them).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fhir_adapter.record import CLINICAL_TYPES

Json = Any  # a JSON value: None, bool, int, float, str, list or dict of those
JsonObject = dict[str, Any]

# Strings that parse as numbers or dates in some reader or other, or break naive text
# handling: NaN-likes, overflowing exponents, other scripts' digits, bidi overrides,
# control and zero-width characters, a lone surrogate, and one very long string.
AWKWARD_TEXT = [
    "",
    " ",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "1e999",
    "-0",
    "0x1F",
    "١٢٣",
    "\u202eevil",
    "a\x00b",
    "\r\nX-Injected: 1",
    "\u200b",
    "\ud800",
    "💉🩸",
    "../../etc/passwd",
    "x" * 10_000,
]
AWKWARD_NUMBERS: list[int | float] = [
    0,
    -1,
    2**63,
    -(2**63) - 1,
    10**400,
    1e308,
    -1e-308,
    5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
]
DATES = [
    "2020",
    "2020-03",
    "2020-03-01",
    "2020-02-30",
    "2020-03-01T12:00:00Z",
    "2020-03-01T12:00:00",
    "2020-03-01T12:00:00+14:00",
    "2020-03-01T24:00:00Z",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59-05:00",
    "0000",
    "99999-01-01",
    "last tuesday",
]


def nested(depth: int) -> Json:
    """A list nested ``depth`` deep around a string."""
    value: Json = "leaf"
    for _ in range(depth):
        value = [value]
    return value


leaves: st.SearchStrategy[Json] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from(AWKWARD_NUMBERS),
    st.text(max_size=12),
    st.sampled_from(AWKWARD_TEXT),
)
json_values: st.SearchStrategy[Json] = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
# A shallow value most of the time; now and then one nested 40 to 240 deep (below the
# depth where orjson stops writing, so each reader sees it whole).
hostile: st.SearchStrategy[Json] = st.one_of(json_values, st.integers(40, 240).map(nested))


def maybe(good: st.SearchStrategy[Json]) -> st.SearchStrategy[Json]:
    """The right shape, or any hostile value in its place."""
    return st.one_of(good, hostile)


dates = maybe(st.one_of(st.sampled_from(DATES), st.datetimes().map(lambda d: d.isoformat())))
SYSTEMS = [
    "http://loinc.org",
    "http://snomed.info/sct",
    "http://www.nlm.nih.gov/research/umls/rxnorm",
    "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:hospital:local",
]
codings = st.fixed_dictionaries(
    {},
    optional={
        "system": maybe(st.sampled_from(SYSTEMS)),
        "code": maybe(st.text(min_size=1, max_size=8)),
        "display": hostile,
    },
)
concepts = maybe(
    st.fixed_dictionaries({}, optional={"coding": maybe(st.lists(codings, max_size=3))})
)
quantities = maybe(
    st.fixed_dictionaries(
        {},
        optional={
            "value": maybe(st.floats(-1e6, 1e6) | st.sampled_from(AWKWARD_NUMBERS)),
            "unit": hostile,
            "code": maybe(st.sampled_from(["mg/dL", "mmol/L", "%"])),
        },
    )
)
periods = maybe(st.fixed_dictionaries({}, optional={"start": dates, "end": dates}))
encounter_refs = maybe(
    st.fixed_dictionaries(
        {"reference": maybe(st.sampled_from(["Encounter/e1", "Encounter/e2", "urn:uuid:e1"]))}
    )
)
statuses = maybe(
    st.sampled_from(
        ["final", "finished", "in-progress", "completed", "active", "entered-in-error", "cancelled"]
    )
)
categories = maybe(
    st.lists(st.one_of(concepts, st.just({"coding": [{"code": "laboratory"}]})), max_size=2)
)

_FIELDS: dict[str, dict[str, st.SearchStrategy[Json]]] = {
    "Patient": {
        "birthDate": dates,
        "gender": maybe(st.sampled_from(["female", "male", "other", "unknown"])),
        "deceasedDateTime": dates,
        "deceasedBoolean": hostile,
    },
    "Encounter": {
        "status": statuses,
        "class": maybe(
            st.one_of(
                st.fixed_dictionaries({"code": maybe(st.sampled_from(["IMP", "AMB", "EMER"]))}),
                st.lists(codings, max_size=2),
            )
        ),
        "period": periods,
        "identifier": hostile,
    },
    "Observation": {
        "status": statuses,
        "category": categories,
        "code": concepts,
        "valueQuantity": quantities,
        "component": maybe(
            st.lists(
                st.fixed_dictionaries({}, optional={"code": concepts, "valueQuantity": quantities}),
                max_size=3,
            )
        ),
        "effectiveDateTime": dates,
        "effectivePeriod": periods,
        "issued": dates,
        "encounter": encounter_refs,
    },
    "Condition": {
        "verificationStatus": concepts,
        "code": concepts,
        "onsetDateTime": dates,
        "onsetPeriod": periods,
        "recordedDate": dates,
        "encounter": encounter_refs,
    },
    "Procedure": {
        "status": statuses,
        "code": concepts,
        "performedDateTime": dates,
        "performedPeriod": periods,
        "encounter": encounter_refs,
    },
    "MedicationRequest": {
        "status": statuses,
        "medicationCodeableConcept": concepts,
        "medicationReference": maybe(
            st.fixed_dictionaries({"reference": maybe(st.sampled_from(["Medication/m1", "#c1"]))})
        ),
        "contained": hostile,
        "authoredOn": dates,
        "dispenseRequest": maybe(st.fixed_dictionaries({"validityPeriod": periods})),
        "encounter": encounter_refs,
    },
    "MedicationAdministration": {
        "status": statuses,
        "medicationCodeableConcept": concepts,
        "effectiveDateTime": dates,
        "effectivePeriod": periods,
        "context": encounter_refs,
    },
    "Medication": {"code": concepts},
}
_COMMON: dict[str, st.SearchStrategy[Json]] = {
    "meta": maybe(st.fixed_dictionaries({"lastUpdated": dates})),
    "junk": hostile,
}


P1 = st.just("p1")
RESOURCE_IDS = maybe(st.sampled_from(["r1", "r2", "e1", "e2", "m1"]))


def resources(
    resource_type: str,
    *,
    patient_id: st.SearchStrategy[Json] = P1,
    rid: st.SearchStrategy[Json] = RESOURCE_IDS,
) -> st.SearchStrategy[JsonObject]:
    """Resources of ``resource_type`` whose fields are each present or not, well formed or
    hostile. Non-Patient resources name ``patient_id`` as their subject."""
    required: dict[str, st.SearchStrategy[Json]] = {
        "resourceType": st.just(resource_type),
        "id": patient_id if resource_type == "Patient" else rid,
    }
    if resource_type not in ("Patient", "Medication"):
        required["subject"] = patient_id.map(lambda pid: {"reference": f"Patient/{pid}"})
    return st.fixed_dictionaries(required, optional={**_FIELDS[resource_type], **_COMMON})


def clinical_resources(patient_id: st.SearchStrategy[Json] = P1) -> st.SearchStrategy[JsonObject]:
    """Any clinical resource the adapter reads, for one patient."""
    return st.one_of(*(resources(t, patient_id=patient_id) for t in CLINICAL_TYPES))
