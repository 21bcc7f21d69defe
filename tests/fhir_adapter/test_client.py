"""The REST client against a real FHIR server process (sekmet-fhir), faults injected only
where a real server cannot produce them on demand."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.errors import (
    FhirNotFound,
    FhirTimeout,
    FhirUnavailable,
    FhirUpstreamError,
)
from fhir_adapter.local_server import start_fhir_server
from fhir_adapter.normalize import build_timeline
from fhir_adapter.upload import upload_record
from tests.conftest import LoadedServer
from tests.support.faults import FaultTransport, first_n
from tests.support.timelines import timeline_content


async def test_server_and_files_give_the_same_timeline(loaded_fhir: LoadedServer) -> None:
    async with loaded_fhir.client() as client:
        for record in loaded_fhir.records:
            fetched = await client.fetch_patient(record.patient_id)
            from_server = build_timeline(fetched)
            from_files = build_timeline(record)
            assert from_server.events, "sample patients must have events"
            assert timeline_content(from_server) == timeline_content(from_files), record.patient_id
            assert from_server.source.source == loaded_fhir.base_url


async def test_search_follows_next_links_over_many_pages(loaded_fhir: LoadedServer) -> None:
    record = max(loaded_fhir.records, key=lambda r: len(r.resources))
    expected = sum(1 for r in record.resources if r["resourceType"] == "Observation")
    assert expected > 25, "the sample must need several pages"
    transport = FaultTransport(lambda request, n: None)
    config = FhirClientConfig(base_url=loaded_fhir.base_url, page_size=10)
    async with FhirClient(config, transport=transport) as client:
        ids = [
            e.resource["id"]
            async for e in client.search("Observation", {"patient": record.patient_id})
        ]
    assert len(ids) == expected
    assert len(set(ids)) == expected, "no page may repeat or skip entries"
    assert len(transport.requests) == -(-expected // 10)


async def test_incremental_fetch_returns_only_newer_resources(
    loaded_fhir: LoadedServer,
) -> None:
    record = loaded_fhir.records[0]
    async with loaded_fhir.client() as client:
        first = build_timeline(await client.fetch_patient(record.patient_id))
        watermark = first.source.last_updated
        assert watermark is not None
        nothing_new = await client.fetch_patient(record.patient_id, since=watermark)
        assert nothing_new.resources == []
        visit = first.visits[-1]
        new_lab = {
            "resourceType": "Observation",
            "id": "incremental-test-lab",
            "status": "final",
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
            "subject": {"reference": f"Patient/{record.patient_id}"},
            "encounter": {"reference": f"Encounter/{visit.encounter_ids[0]}"},
            "effectiveDateTime": visit.start.isoformat(),
            "valueQuantity": {"value": 5.4, "unit": "mmol/L", "code": "mmol/L"},
        }
        await asyncio.sleep(0.01)  # a later lastUpdated than the watermark, to the millisecond
        await client.request("PUT", "Observation/incremental-test-lab", json=new_lab)
        delta = await client.fetch_patient(record.patient_id, since=watermark)
        await client.request(
            "DELETE", "Observation/incremental-test-lab", expect=frozenset({200, 204})
        )
    assert [r["id"] for r in delta.resources] == ["incremental-test-lab"]
    newer = build_timeline(delta).source.last_updated
    assert newer is not None
    assert newer > watermark


async def test_unknown_patient_is_not_found(loaded_fhir: LoadedServer) -> None:
    async with loaded_fhir.client() as client:
        with pytest.raises(FhirNotFound) as caught:
            await client.fetch_patient("no-such-patient")
    assert caught.value.status == 404
    assert caught.value.outcome is not None
    assert caught.value.outcome["resourceType"] == "OperationOutcome"


async def test_429_is_retried_after_retry_after(loaded_fhir: LoadedServer) -> None:
    transport = FaultTransport(first_n(2, 429, {"Retry-After": "1"}))
    config = FhirClientConfig(base_url=loaded_fhir.base_url, max_retries=3)
    patient_id = loaded_fhir.records[0].patient_id
    async with FhirClient(config, transport=transport) as client:
        started = time.monotonic()
        patient = await client.read("Patient", patient_id)
        waited = time.monotonic() - started
    assert patient["id"] == patient_id
    assert len(transport.requests) == 3
    assert waited >= 2.0, "each 429 said Retry-After: 1"


async def test_429_beyond_the_retry_budget_is_a_clear_error(loaded_fhir: LoadedServer) -> None:
    transport = FaultTransport(first_n(10, 429, {"Retry-After": "0"}))
    config = FhirClientConfig(base_url=loaded_fhir.base_url, max_retries=2)
    async with FhirClient(config, transport=transport) as client:
        with pytest.raises(FhirUpstreamError) as caught:
            await client.read("Patient", loaded_fhir.records[0].patient_id)
    assert caught.value.status == 429
    assert "injected" in str(caught.value)
    assert len(transport.requests) == 3


async def test_503_is_retried_for_reads_but_not_for_writes(loaded_fhir: LoadedServer) -> None:
    config = FhirClientConfig(base_url=loaded_fhir.base_url, max_retries=2, backoff_base=0.01)
    reads = FaultTransport(first_n(1, 503))
    async with FhirClient(config, transport=reads) as client:
        await client.read("Patient", loaded_fhir.records[0].patient_id)
    assert len(reads.requests) == 2
    writes = FaultTransport(first_n(1, 503))
    async with FhirClient(config, transport=writes) as client:
        with pytest.raises(FhirUpstreamError):
            await client.transaction({"resourceType": "Bundle", "type": "transaction"})
    assert len(writes.requests) == 1


async def test_next_link_to_another_host_is_refused(loaded_fhir: LoadedServer) -> None:
    def foreign_next(request: httpx.Request, n: int) -> httpx.Response | None:
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": "http://attacker.example/fhir?page=2"}],
            "entry": [],
        }
        return httpx.Response(200, json=bundle)

    config = FhirClientConfig(base_url=loaded_fhir.base_url)
    async with FhirClient(config, transport=FaultTransport(foreign_next)) as client:
        with pytest.raises(FhirUpstreamError, match="outside the FHIR server"):
            _ = [e async for e in client.search("Observation", {"patient": "x"})]


async def test_stopped_server_gives_a_clear_error_without_hanging(
    sekmet_executable: Path, tmp_path: Path, loaded_fhir: LoadedServer
) -> None:
    server = start_fhir_server(sekmet_executable, tmp_path / "doomed")
    config = FhirClientConfig(base_url=server.base_url, max_retries=2, backoff_base=0.05)
    record = loaded_fhir.records[0]
    try:
        async with FhirClient(config) as client:
            await upload_record(client, record)
            assert (await client.fetch_patient(record.patient_id)).patient is not None
            server.stop()
            started = time.monotonic()
            with pytest.raises(FhirUnavailable, match="unreachable"):
                await client.fetch_patient(record.patient_id)
            assert time.monotonic() - started < 5.0
    finally:
        server.stop()


async def test_silent_server_times_out(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers must not hang the caller."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    config = FhirClientConfig(base_url=f"http://127.0.0.1:{port}/fhir", timeout=0.5)
    try:
        async with FhirClient(config) as client:
            started = time.monotonic()
            with pytest.raises(FhirTimeout):
                await client.read("Patient", "p1")
            assert time.monotonic() - started < timedelta(seconds=3).total_seconds()
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()
