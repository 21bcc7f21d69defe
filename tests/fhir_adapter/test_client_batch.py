"""The incremental patient fetch in FHIR batch requests, against the real FHIR server
(sekmet-fhir takes batch and sorts): one batch of probes when nothing is new, a second with
the searches of the types that changed, the filter for a server that does not show its
sort; the same record as separate requests, later pages of an entry followed, a failed
entry failing as the same request alone would, and separate requests
for a server that refuses batch. Faults are injected only where the real server cannot
show them on demand (a failed entry in an otherwise good answer, a refusing server)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.errors import FhirError, FhirNotFound, FhirUnauthorized, FhirUpstreamError
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import CLINICAL_TYPES, PatientRecord
from tests.conftest import LoadedServer
from tests.support.faults import FaultTransport, RewriteTransport, outcome
from tests.support.fhir_writes import delete_resources, new_visit, put_resources
from tests.support.timelines import timeline_content

LONG_AGO = datetime(1900, 1, 1, tzinfo=UTC)  # "updated since then": everything


def _config(loaded: LoadedServer, **overrides: Any) -> FhirClientConfig:
    settings: dict[str, Any] = {"base_url": loaded.base_url, "page_size": 50,
                                "backoff_base": 0.01}  # fmt: skip
    return FhirClientConfig(**{**settings, **overrides})


def _content(record: PatientRecord) -> tuple[object, ...]:
    return (
        record.patient,
        sorted((r["resourceType"], r["id"]) for r in record.resources),
        record.medications,
        timeline_content(build_timeline(record)),
    )


def _is_batch(request: httpx.Request, loaded: LoadedServer) -> bool:
    return request.method == "POST" and str(request.url) == loaded.base_url


async def _watermark(loaded: LoadedServer, patient_id: str) -> datetime:
    async with loaded.client() as client:
        watermark = build_timeline(await client.fetch_patient(patient_id)).source.last_updated
    assert watermark is not None
    return watermark


def _sent_urls(request: httpx.Request) -> list[str]:
    sent = json.loads(request.content)
    assert sent["type"] == "batch"
    return [e["request"]["url"] for e in sent["entry"]]


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(url.split("?", 1)[1])


async def test_with_nothing_new_an_incremental_fetch_is_one_batch_of_probes(
    loaded_fhir: LoadedServer,
) -> None:
    record = loaded_fhir.records[0]
    since = await _watermark(loaded_fhir, record.patient_id)
    transport = FaultTransport(lambda request, n: None)
    async with FhirClient(_config(loaded_fhir), transport=transport) as client:
        batched = await client.fetch_patient(record.patient_id, since=since)
        assert client.batch_supported is True
        assert client.sort_supported is None, "sekmet sorts by _lastUpdated"
    (request,) = transport.requests
    assert _is_batch(request, loaded_fhir)
    assert request.headers["Cache-Control"] == "no-cache", "a server's search cache is skipped"
    urls = _sent_urls(request)
    assert urls[0] == f"Patient/{record.patient_id}"
    assert [u.split("?")[0] for u in urls[1:]] == list(CLINICAL_TYPES)
    for url in urls[1:]:
        assert _query(url) == {"patient": [record.patient_id], "_sort": ["-_lastUpdated"],
                               "_count": ["1"]}  # fmt: skip
    async with FhirClient(_config(loaded_fhir)) as separate:
        separate.batch_supported = False
        alone = await separate.fetch_patient(record.patient_id, since=since)
    assert batched.resources == alone.resources == []
    assert batched.patient == alone.patient
    assert batched.source == alone.source == loaded_fhir.base_url


async def test_only_the_types_that_changed_are_searched(loaded_fhir: LoadedServer) -> None:
    """New data on the server after the watermark: the probes single out Encounter and
    Observation, and a second batch searches those two, finding exactly the new data."""
    record = loaded_fhir.records[2]
    since = await _watermark(loaded_fhir, record.patient_id)
    added = new_visit(record.patient_id, "probe-test", datetime(2030, 1, 2, tzinfo=UTC))
    transport = FaultTransport(lambda request, n: None)
    async with loaded_fhir.client() as writer:
        await put_resources(writer, added)
        try:
            async with FhirClient(_config(loaded_fhir), transport=transport) as client:
                delta = await client.fetch_patient(record.patient_id, since=since)
            async with FhirClient(_config(loaded_fhir)) as separate:
                separate.batch_supported = False
                alone = await separate.fetch_patient(record.patient_id, since=since)
        finally:
            await delete_resources(writer, added)
    probes, searches = transport.requests
    assert len(_sent_urls(probes)) == 1 + len(CLINICAL_TYPES)
    urls = _sent_urls(searches)
    assert [u.split("?")[0] for u in urls] == ["Encounter", "Observation"]
    assert all(_query(u)["_lastUpdated"][0].startswith("gt") for u in urls)
    assert sorted((r["resourceType"], r["id"]) for r in delta.resources) == [
        ("Encounter", "enc-probe-test"), ("Observation", "obs-probe-test")]  # fmt: skip
    assert _content(delta) == _content(alone)


# How a server can leave a probe unbelievable: it did not say it sorted, or it said it
# ignored something.
UNSORTED: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "self-link-without-sort": lambda page: {**page, "link": [
        {**link, "url": link["url"].replace("_sort=-_lastUpdated", "")}
        for link in page.get("link", [])]},
    "no-self-link": lambda page: {**page, "link": []},
    "operation-outcome": lambda page: {**page, "entry": [*page.get("entry", []), {
        "resource": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "not-supported", "diagnostics": "sort ignored"}]},
        "search": {"mode": "outcome"}}]},
}  # fmt: skip


@pytest.mark.parametrize("how", UNSORTED, ids=list(UNSORTED))
async def test_a_server_that_does_not_show_its_sort_is_searched_with_the_filter(
    loaded_fhir: LoadedServer, how: str
) -> None:
    """A probe that cannot be believed counts as "changed": nothing new is missed, and the
    client asks with ``_lastUpdated`` searches from then on."""
    record = loaded_fhir.records[0]
    since = await _watermark(loaded_fhir, record.patient_id)
    added = new_visit(record.patient_id, f"unsorted-{how}", datetime(2030, 1, 3, tzinfo=UTC))
    hide = UNSORTED[how]

    def unsorted(request: httpx.Request, body: Any) -> Any:
        if request.method != "POST":
            return None
        for entry in body["entry"]:
            page = entry.get("resource") or {}
            if any("_sort" in link.get("url", "") for link in page.get("link", [])):
                entry["resource"] = hide(page)
        return body

    transport = RewriteTransport(unsorted)
    async with loaded_fhir.client() as writer:
        await put_resources(writer, added)
        try:
            async with FhirClient(_config(loaded_fhir), transport=transport) as client:
                delta = await client.fetch_patient(record.patient_id, since=since)
                assert client.sort_supported is False
                again = await client.fetch_patient(record.patient_id, since=since)
        finally:
            await delete_resources(writer, added)
    _, first_searches, second = (_sent_urls(r) for r in transport.requests)
    assert [u.split("?")[0] for u in first_searches] == list(CLINICAL_TYPES), "all searched"
    assert second[0] == f"Patient/{record.patient_id}"
    assert all("_lastUpdated" in _query(u) for u in second[1:]), "no probes any more"
    for fetched in (delta, again):
        assert sorted(r["id"] for r in fetched.resources) == [
            f"enc-unsorted-{how}", f"obs-unsorted-{how}"]  # fmt: skip


async def test_later_pages_of_a_batch_entry_are_followed(loaded_fhir: LoadedServer) -> None:
    record = max(loaded_fhir.records, key=lambda r: len(r.resources))
    page = 10
    matches = Counter(r["resourceType"] for r in record.resources)
    assert max(matches.values()) > 2 * page, "the sample must need several pages"
    transport = FaultTransport(lambda request, n: None)
    async with FhirClient(_config(loaded_fhir, page_size=page), transport=transport) as client:
        batched = await client.fetch_patient(record.patient_id, since=LONG_AGO)
        whole = await client.fetch_patient(record.patient_id)  # separate requests, no since
    assert _is_batch(transport.requests[0], loaded_fhir)
    followed = [r for r in transport.requests[1:] if "_lastUpdated" in r.url.params]
    assert all(r.method == "GET" and int(r.url.params["_offset"]) > 0 for r in followed)
    pages = {t: max(1, -(-matches[t] // page)) for t in CLINICAL_TYPES}
    assert len(followed) == sum(n - 1 for n in pages.values()), "each later page once"
    assert _content(batched) == _content(whole)
    assert len(batched.resources) == len(record.resources)


async def test_an_unknown_patient_in_a_batch_is_not_found(loaded_fhir: LoadedServer) -> None:
    transport = FaultTransport(lambda request, n: None)
    async with FhirClient(_config(loaded_fhir), transport=transport) as client:
        with pytest.raises(FhirNotFound) as batched:
            await client.fetch_patient("no-such-patient", since=LONG_AGO)
        assert client.batch_supported is True, "an entry's failure is not a refused batch"
    assert len(transport.requests) == 1
    async with FhirClient(_config(loaded_fhir)) as separate:
        separate.batch_supported = False
        with pytest.raises(FhirNotFound) as alone:
            await separate.fetch_patient("no-such-patient", since=LONG_AGO)
    assert batched.value.status == alone.value.status == 404
    assert batched.value.message == alone.value.message
    assert batched.value.outcome is not None
    assert batched.value.outcome["resourceType"] == "OperationOutcome"


# Which entry fails (0: the Patient read, then CLINICAL_TYPES in order) and how.
FAILED_ENTRIES = {
    "patient-403": (0, 403, FhirUnauthorized),
    "patient-410": (0, 410, FhirNotFound),
    "search-404": (5, 404, FhirUpstreamError),  # a search "gone", not a missing patient
    "search-400": (2, 400, FhirUpstreamError),
    "search-500": (1, 500, FhirUpstreamError),
}


def _path_of(index: int, patient_id: str) -> str:
    return f"/fhir/Patient/{patient_id}" if index == 0 else f"/fhir/{CLINICAL_TYPES[index - 1]}"


@pytest.mark.parametrize("case", FAILED_ENTRIES, ids=list(FAILED_ENTRIES))
async def test_a_failed_entry_fails_as_the_request_alone_would(
    loaded_fhir: LoadedServer, case: str
) -> None:
    index, status, kind = FAILED_ENTRIES[case]
    patient = loaded_fhir.records[0].patient_id
    reason = f"injected {status}"

    def fail_entry(request: httpx.Request, body: Any) -> Any:
        if request.method != "POST":
            return None
        failed = outcome(status, reason).json()
        body["entry"][index] = {"response": {"status": f"{status} Whatever", "outcome": failed}}
        return body

    def fail_request(request: httpx.Request, n: int) -> httpx.Response | None:
        return outcome(status, reason) if request.url.path == _path_of(index, patient) else None

    batch = RewriteTransport(fail_entry)
    async with FhirClient(_config(loaded_fhir), transport=batch) as client:
        with pytest.raises(FhirError) as batched:
            await client.fetch_patient(patient, since=LONG_AGO)
    alone = FaultTransport(fail_request)
    async with FhirClient(_config(loaded_fhir), transport=alone) as separate:
        separate.batch_supported = False
        with pytest.raises(FhirError) as expected:
            await separate.fetch_patient(patient, since=LONG_AGO)
    assert type(batched.value) is type(expected.value) is kind
    assert batched.value.status == expected.value.status
    assert batched.value.message == expected.value.message
    assert len(batch.requests) == 1, "nothing is asked again for an entry that failed"


@pytest.mark.parametrize("status", [429, 503])
async def test_an_entry_to_retry_is_sent_again_alone(
    loaded_fhir: LoadedServer, status: int
) -> None:
    record = loaded_fhir.records[1]

    def throttle_observations(request: httpx.Request, body: Any) -> Any:
        if request.method != "POST":
            return None
        (index,) = [i for i, url in enumerate(_sent_urls(request)) if url.startswith("Observ")]
        body["entry"][index] = {"response": {"status": str(status)}}
        return body

    transport = RewriteTransport(throttle_observations)
    async with FhirClient(_config(loaded_fhir), transport=transport) as client:
        batched = await client.fetch_patient(record.patient_id, since=LONG_AGO)
        whole = await client.fetch_patient(record.patient_id)
    probe_again, _, search_again = transport.requests[1:4]
    for again in (probe_again, search_again):  # the probe, then the search, of Observation
        assert again.method == "GET"
        assert again.url.path == "/fhir/Observation"
    assert probe_again.url.params["_sort"] == "-_lastUpdated"
    assert "_lastUpdated" in search_again.url.params
    assert _content(batched) == _content(whole)


def _without_status(request: httpx.Request, body: Any) -> Any:
    if request.method == "POST":
        body["entry"][3]["response"] = {}
    return body if request.method == "POST" else None


async def test_an_entry_without_a_status_is_a_server_error(loaded_fhir: LoadedServer) -> None:
    patient = loaded_fhir.records[0].patient_id
    async with FhirClient(_config(loaded_fhir), transport=RewriteTransport(_without_status)) as c:
        with pytest.raises(FhirUpstreamError, match="without an HTTP status"):
            await c.fetch_patient(patient, since=LONG_AGO)


# --- servers that do not take batch ---------------------------------------------------------


def _refuse_batch(answer: httpx.Response) -> FaultTransport:
    def rule(request: httpx.Request, n: int) -> httpx.Response | None:
        return answer if request.method == "POST" else None

    return FaultTransport(rule)


REFUSALS = {
    "400": outcome(400, "batch not supported"),
    "404": outcome(404, "no such endpoint"),
    "405": httpx.Response(405, text="Method Not Allowed"),
    "415": outcome(415, "unsupported media type"),
    "501": outcome(501, "not implemented"),
    "not-a-batch-response": httpx.Response(200, json={"resourceType": "CapabilityStatement"}),
    "not-json": httpx.Response(200, text="<html>a proxy's page</html>"),
    "too-few-entries": httpx.Response(
        200, json={"resourceType": "Bundle", "type": "batch-response", "entry": []}
    ),
}


@pytest.mark.parametrize("refusal", REFUSALS, ids=list(REFUSALS))
async def test_a_server_that_refuses_batch_is_asked_with_separate_requests(
    loaded_fhir: LoadedServer, refusal: str
) -> None:
    record = max(loaded_fhir.records, key=lambda r: len(r.resources))
    transport = _refuse_batch(REFUSALS[refusal])
    async with FhirClient(_config(loaded_fhir), transport=transport) as client:
        first = await client.fetch_patient(record.patient_id, since=LONG_AGO)
        assert client.batch_supported is False
        posts = sum(r.method == "POST" for r in transport.requests)
        second = await client.fetch_patient(record.patient_id, since=LONG_AGO)
        whole = await client.fetch_patient(record.patient_id)
    assert posts == 1
    assert sum(r.method == "POST" for r in transport.requests) == 1, "the refusal is remembered"
    assert _content(first) == _content(second) == _content(whole)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, FhirUnauthorized), (429, FhirUpstreamError), (500, FhirUpstreamError)],
)
async def test_failures_separate_requests_would_meet_too_are_not_refusals(
    loaded_fhir: LoadedServer, status: int, kind: type[FhirError]
) -> None:
    transport = _refuse_batch(outcome(status))
    patient = loaded_fhir.records[0].patient_id
    async with FhirClient(_config(loaded_fhir, max_retries=1), transport=transport) as client:
        with pytest.raises(kind) as caught:
            await client.fetch_patient(patient, since=LONG_AGO)
        assert client.batch_supported is None
    assert caught.value.status == status
    assert all(r.method == "POST" for r in transport.requests)


async def test_a_batch_of_reads_is_retried_on_503(loaded_fhir: LoadedServer) -> None:
    def once(request: httpx.Request, n: int) -> httpx.Response | None:
        return outcome(503) if n == 1 else None

    transport = FaultTransport(once)
    record = loaded_fhir.records[0]
    async with FhirClient(_config(loaded_fhir), transport=transport) as client:
        delta = await client.fetch_patient(record.patient_id, since=LONG_AGO)
        assert client.batch_supported is True
    assert [r.method for r in transport.requests[:2]] == ["POST", "POST"]
    assert len(delta.resources) == len(record.resources)
