"""Fuzzed CDS prefetch through the whole service: the hostile resources of
``tests.fuzz.strategies`` posted as a patient-view call's prefetch reach the normaliser,
the tokenizer, the engine, the store and the card builder. Whatever the data, the answer is
cards (200) or an OperationOutcome saying why the record cannot be scored (422), in
bounded time; never a 5xx. The prefetch is complete, so no FHIR server is involved."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.cds.services import PREFETCH
from tests.fuzz.strategies import Json, JsonObject, dates, hostile, resources
from tests.service.conftest import ApiFactory

PATH = "/cds-services/ehrmamba-patient-view"
CALL_BOUND_S = 30.0


@pytest.fixture
async def api(make_api: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api(cds_require_jwt=False) as client:
        yield client


# One sound inpatient stay around the strategies' favourite date, so that fuzzed events
# have a visit to land in and most calls reach the tokenizer and the engine.
STAY = {
    "resourceType": "Encounter",
    "id": "stay",
    "status": "finished",
    "class": {"code": "IMP"},
    "subject": {"reference": "Patient/p1"},
    "period": {"start": "2020-02-28T00:00:00Z", "end": "2020-03-05T00:00:00Z"},
}


def _searchset(resource_type: str) -> st.SearchStrategy[Json]:
    """A prefetch key's value: null, or a Bundle of fuzzed resources of its type (and
    Medications, which only some keys include)."""
    entry = st.one_of(resources(resource_type), resources("Medication")).map(
        lambda r: {"resource": r}
    )
    fixed = [{"resource": STAY}] if resource_type == "Encounter" else []
    bundle = st.fixed_dictionaries(
        {
            "resourceType": st.just("Bundle"),
            "type": st.just("searchset"),
            "entry": st.lists(entry, max_size=6).map(lambda fuzzed: [*fixed, *fuzzed]),
        },
        optional={"link": hostile},
    )
    return st.one_of(st.none(), bundle)


# Mostly a usable birth date, so that most calls get past it to the tokenizer and engine.
birth_dates = st.one_of(st.sampled_from(["1950-01-01", "1990-07", "2020"]), dates)
patients = st.tuples(resources("Patient"), birth_dates).map(
    lambda pair: {**pair[0], "id": "p1", "birthDate": pair[1]}
)
prefetches = st.fixed_dictionaries(
    {q.key: patients if q.is_read else _searchset(q.resource_type) for q in PREFETCH}
)


def _body(prefetch: JsonObject) -> bytes:
    call: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid4()),
        "context": {"userId": "Practitioner/fuzz", "patientId": "p1"},
        "prefetch": prefetch,
    }
    return json.dumps(call).encode()  # NaN and Infinity as Python's json writes them


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(prefetch=prefetches)
async def test_any_prefetch_is_cards_or_a_client_error(
    api: httpx.AsyncClient, prefetch: JsonObject
) -> None:
    headers = {"Content-Type": "application/json"}
    async with asyncio.timeout(CALL_BOUND_S):
        response = await api.post(PATH, content=_body(prefetch), headers=headers)
    assert response.status_code in (200, 422), response.text
    body = response.json()
    if response.status_code == 200:
        assert isinstance(body["cards"], list)
    else:
        assert body["resourceType"] == "OperationOutcome"
