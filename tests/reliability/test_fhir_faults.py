"""FHIR server faults: stopped, too slow, failing, throttling, sending what is not FHIR.

Each is answered by an OperationOutcome with the status a client can act on (502 FHIR
failure, 504 FHIR timeout) within a bound set by the timeout, retries and backoff; the
service stays ready, records nothing for a failed call, never scores a partial record,
and answers again once the server does. The stopped server is a real server process; the
other faults come from ``FaultServer`` in front of the real server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.local_server import start_fhir_server
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from fhir_adapter.upload import upload_record
from tests.conftest import LoadedServer
from tests.reliability.conftest import outcome, predicted, same_predictions, small_patient
from tests.reliability.fault_server import FaultServer, Rule, is_later_page
from tests.reliability.processes import restart_fhir_server
from tests.service.conftest import ApiFactory

DEFAULTS = FhirClientConfig(base_url="")  # the service's FHIR client: backoff, page size
FHIR_JSON = "application/fhir+json"
SLACK_S = 2.0  # scheduling and loopback round trips on a loaded CI machine


def _max_backoff(retries: int) -> float:
    """The longest the client can wait between its attempts: jittered doubling, at most
    1.5 times the nominal step."""
    return sum(DEFAULTS.backoff_base * 2.0 ** (n - 1) * 1.5 for n in range(1, retries + 1))


async def _timed(call: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await call
    return response, time.monotonic() - started


async def _history(api: httpx.AsyncClient, patient: str) -> list[int]:
    response = await api.get(f"/patients/{patient}/predictions")
    assert response.status_code == 200, response.text
    return [row["id"] for row in response.json()["predictions"]]


def _outcome_json(status: int, diagnostics: str, headers: dict[str, str] | None = None) -> Response:
    issue = {"severity": "error", "code": "exception", "diagnostics": diagnostics}
    body = json.dumps({"resourceType": "OperationOutcome", "issue": [issue]})
    return Response(body, status, headers=headers, media_type=FHIR_JSON)


def _always(answer: Callable[[], Response]) -> Rule:
    async def rule(request: Request, n: int) -> Response | None:
        return answer()

    return rule


@pytest.fixture
def fault_fhir(loaded_fhir: LoadedServer) -> Iterator[FaultServer]:
    with FaultServer(loaded_fhir.base_url) as server:
        yield server


# --- 1. the FHIR server process stops ------------------------------------------------------


async def test_a_stopped_fhir_server_is_a_bounded_502_and_the_service_recovers(
    make_api: ApiFactory,
    loaded_fhir: LoadedServer,
    sekmet_executable: Path,
    tmp_path: Path,
) -> None:
    patient = small_patient(loaded_fhir)
    record = next(r for r in loaded_fhir.records if r.patient_id == patient)
    server = start_fhir_server(sekmet_executable, tmp_path / "fhir")
    try:
        async with FhirClient(FhirClientConfig(base_url=server.base_url)) as client:
            await upload_record(client, record)
        async with make_api(fhir_base_url=server.base_url) as api:
            before = predicted(await api.post(f"/patients/{patient}/predict"))

            server.stop()
            response, seconds = await _timed(api.post(f"/patients/{patient}/predict"))
            assert outcome(response, 502) == "the FHIR server failed: unreachable"
            retries = 3  # the service's default EHRMAMBA_FHIR_RETRIES
            assert seconds <= _max_backoff(retries) + SLACK_S
            ready = await api.get("/health/ready")
            assert ready.status_code == 200, "a FHIR outage is not the service's own failure"

            server = restart_fhir_server(server)  # same port, same data
            after = predicted(await api.post(f"/patients/{patient}/predict"))
            same_predictions(after["predictions"], before["predictions"])  # from the cache
            assert await _history(api, patient) == [after["id"], before["id"]]
    finally:
        server.stop()


# --- 2. the FHIR server is slower than the timeout -----------------------------------------

TIMEOUT_S = 0.5
RETRIES = 2


async def _never_in_time(request: Request, n: int) -> Response | None:
    await asyncio.sleep(30)  # dropped when the fault server stops
    return Response("{}", media_type=FHIR_JSON)


async def _a_byte_at_a_time(request: Request, n: int) -> Response | None:
    """A Patient, one byte every 0.3 s: each read is within the timeout, the whole answer
    takes many times it."""

    async def trickle() -> AsyncIterator[bytes]:
        for byte in b'{"resourceType": "Patient", "id": "p", "gender": "female"}':
            await asyncio.sleep(0.3)
            yield bytes([byte])

    return StreamingResponse(trickle(), media_type=FHIR_JSON)


@pytest.mark.parametrize("rule", [_never_in_time, _a_byte_at_a_time], ids=["silent", "trickle"])
async def test_a_fhir_server_slower_than_the_timeout_is_a_bounded_504(
    make_api: ApiFactory, loaded_fhir: LoadedServer, fault_fhir: FaultServer, rule: Rule
) -> None:
    patient = small_patient(loaded_fhir)
    settings = {"fhir_base_url": fault_fhir.base_url, "fhir_timeout": TIMEOUT_S,
                "fhir_retries": RETRIES}  # fmt: skip
    async with make_api(**settings) as api:
        fault_fhir.rule = rule
        response, seconds = await _timed(api.post(f"/patients/{patient}/predict"))
        assert "did not answer in time" in outcome(response, 504)
        assert seconds <= TIMEOUT_S * (RETRIES + 1) + SLACK_S
        assert (await api.get("/health/ready")).status_code == 200


# --- 3. the FHIR server fails or throttles -------------------------------------------------


async def test_a_500_is_not_retried_and_a_503_is_retried_before_a_502(
    make_api: ApiFactory, loaded_fhir: LoadedServer, fault_fhir: FaultServer
) -> None:
    patient = small_patient(loaded_fhir)
    settings = {"fhir_base_url": fault_fhir.base_url, "fhir_retries": RETRIES}
    async with make_api(**settings) as api:
        fault_fhir.rule = _always(lambda: _outcome_json(500, "disk on fire"))
        response = await api.post(f"/patients/{patient}/predict")
        assert outcome(response, 502) == "the FHIR server failed: HTTP 500"
        assert len(fault_fhir.seen) == 1, "a 500 may mean the server is broken: not retried"

        fault_fhir.seen.clear()
        fault_fhir.rule = _always(lambda: _outcome_json(503, "down for maintenance"))
        response, seconds = await _timed(api.post(f"/patients/{patient}/predict"))
        assert outcome(response, 502) == "the FHIR server failed: HTTP 503"
        assert len(fault_fhir.seen) == RETRIES + 1
        assert seconds <= _max_backoff(RETRIES) + SLACK_S
        assert await _history(api, patient) == []


async def test_429_retry_after_is_honoured_then_a_502(
    make_api: ApiFactory, loaded_fhir: LoadedServer, fault_fhir: FaultServer
) -> None:
    patient = small_patient(loaded_fhir)
    settings = {"fhir_base_url": fault_fhir.base_url, "fhir_retries": RETRIES}
    throttled = _always(lambda: _outcome_json(429, "slow down", {"Retry-After": "1"}))
    async with make_api(**settings) as api:
        fault_fhir.rule = throttled
        response, seconds = await _timed(api.post(f"/patients/{patient}/predict"))
        assert outcome(response, 502) == "the FHIR server failed: HTTP 429"
        assert len(fault_fhir.seen) == RETRIES + 1
        assert RETRIES * 1.0 <= seconds <= RETRIES * 1.0 + SLACK_S, "waits Retry-After each time"

        async def once(request: Request, n: int) -> Response | None:
            return _outcome_json(429, "slow down", {"Retry-After": "1"}) if n == 1 else None

        fault_fhir.seen.clear()
        fault_fhir.rule = once
        response, seconds = await _timed(api.post(f"/patients/{patient}/predict"))
        predicted(response)
        assert seconds >= 1.0, "the second attempt waited for Retry-After"


# --- 4. what the FHIR server sends is not FHIR, or the paging breaks off --------------------


def _paged(records: list[PatientRecord], page_size: int) -> PatientRecord:
    """The smallest loaded patient with a search that spans two pages (a short run)."""
    spanning = [
        r for r in records
        if max(Counter(x["resourceType"] for x in r.resources).values()) > page_size
    ]  # fmt: skip
    assert spanning, "no loaded patient spans two search pages"
    return min(spanning, key=lambda r: len(r.resources))


def _on_later_pages(answer: Callable[[], Response]) -> Rule:
    async def rule(request: Request, n: int) -> Response | None:
        return answer() if is_later_page(request) else None

    return rule


NOT_JSON = "the FHIR server failed: server sent a body that is not JSON"
BROKEN: dict[str, tuple[Rule, str]] = {
    "patient-not-json": (
        _always(lambda: Response('{"resourceType": "Patient", "id": ', media_type=FHIR_JSON)),
        NOT_JSON,
    ),
    "page-not-json": (_on_later_pages(lambda: Response("<html>proxy error</html>")), NOT_JSON),
    "page-not-a-bundle": (
        _on_later_pages(lambda: _outcome_json(200, "wrong thing")),
        "the FHIR server failed: search did not return a Bundle",
    ),
    "page-404": (
        _on_later_pages(lambda: _outcome_json(404, "no such page")),
        "the FHIR server failed: search or search page gone (HTTP 404)",
    ),
    "page-410-expired": (
        _on_later_pages(lambda: _outcome_json(410, "search expired")),
        "the FHIR server failed: search or search page gone (HTTP 410)",
    ),
}


@pytest.mark.parametrize("fault", BROKEN, ids=list(BROKEN))
async def test_a_broken_answer_or_page_chain_is_a_502_never_a_partial_score(
    make_api: ApiFactory, loaded_fhir: LoadedServer, fault_fhir: FaultServer, fault: str
) -> None:
    record = _paged(loaded_fhir.records, DEFAULTS.page_size)
    patient = record.patient_id
    async with make_api(fhir_base_url=fault_fhir.base_url) as api:
        fault_fhir.rule, diagnostics = BROKEN[fault]
        response = await api.post(f"/patients/{patient}/predict")
        assert outcome(response, 502) == diagnostics
        assert fault_fhir.faults > 0
        assert await _history(api, patient) == [], "nothing is recorded for a failed read"

        fault_fhir.rule = None
        whole = predicted(await api.post(f"/patients/{patient}/predict"))
        assert whole["cache"]["record"] == "cold", "the failed read left nothing in the cache"
    async with loaded_fhir.client() as direct:
        timeline = build_timeline(await direct.fetch_patient(patient))
    assert whole["data"]["resources"] == dict(timeline.source.resource_counts)
