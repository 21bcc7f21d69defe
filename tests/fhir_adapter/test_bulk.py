"""Bulk Data ``$export`` round trips against the real FHIR server."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhir_adapter.bulk import BulkExportClient
from fhir_adapter.errors import FhirError
from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import READ_TYPES
from tests.conftest import LoadedServer
from tests.support.timelines import timeline_content


async def test_patient_export_round_trip_gives_the_same_timelines(
    loaded_fhir: LoadedServer, tmp_path: Path
) -> None:
    async with loaded_fhir.client() as client:
        bulk = BulkExportClient(client, poll_interval=0.2)
        manifest = await bulk.export(tmp_path / "export", "patient", types=READ_TYPES)
    assert manifest.output
    assert {f.type for f in manifest.output} <= set(READ_TYPES)
    exported = {
        r.patient_id: build_timeline(r) for r in ExportReader(tmp_path / "export").records()
    }
    assert set(exported) == {r.patient_id for r in loaded_fhir.records}
    for record in loaded_fhir.records:
        assert timeline_content(exported[record.patient_id]) == timeline_content(
            build_timeline(record)
        )


async def test_group_export_holds_only_the_members(
    loaded_fhir: LoadedServer, tmp_path: Path
) -> None:
    members = [r.patient_id for r in loaded_fhir.records[:2]]
    group = {
        "resourceType": "Group",
        "id": "bulk-test-group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in members],
    }
    async with loaded_fhir.client() as client:
        await client.request("PUT", "Group/bulk-test-group", json=group)
        bulk = BulkExportClient(client, poll_interval=0.2)
        await bulk.export(
            tmp_path / "group", "group", group_id="bulk-test-group", types=("Patient", "Encounter")
        )
    reader = ExportReader(tmp_path / "group")
    assert sorted(r.patient_id for r in reader.records()) == sorted(members)


async def test_since_excludes_older_resources(loaded_fhir: LoadedServer, tmp_path: Path) -> None:
    async with loaded_fhir.client() as client:
        bulk = BulkExportClient(client, poll_interval=0.2)
        manifest = await bulk.export(
            tmp_path / "since", "system", types=("Observation",), since=datetime.now(UTC)
        )
    assert manifest.output == ()
    assert list(ExportReader(tmp_path / "since").records()) == []


async def test_cancelled_export_cannot_be_collected(loaded_fhir: LoadedServer) -> None:
    async with loaded_fhir.client() as client:
        bulk = BulkExportClient(client, poll_interval=0.2)
        status_url = await bulk.kickoff("system")
        await bulk.cancel(status_url)
        with pytest.raises(FhirError):
            await bulk.wait(status_url, timeout=10)
