"""Shared fixtures: the real FHIR server process, loaded with a handful of shared patients."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.local_server import FhirServer, install_fhir_server, start_fhir_server
from fhir_adapter.record import PatientRecord
from fhir_adapter.upload import upload_record
from tests.support.samples import clinosim_records, require_shared_data, synthea_records


@dataclass
class LoadedServer:
    """A FHIR server holding ``records`` (by their original ids)."""

    server: FhirServer
    records: list[PatientRecord]

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def client(self, **overrides: object) -> FhirClient:
        """A client for this server; ``overrides`` change FhirClientConfig fields."""
        settings: dict[str, object] = {"base_url": self.base_url, "page_size": 50}
        settings.update(overrides)
        return FhirClient(FhirClientConfig(**settings))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def sekmet_executable() -> Path:
    return install_fhir_server()


@pytest.fixture(scope="session")
def fhir_server(
    sekmet_executable: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FhirServer]:
    server = start_fhir_server(sekmet_executable, tmp_path_factory.mktemp("fhir-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def loaded_fhir(
    fhir_server: FhirServer, tmp_path_factory: pytest.TempPathFactory
) -> LoadedServer:
    """Three Synthea patients and three clinosim patients with inpatient stays."""
    require_shared_data()
    records = [
        *synthea_records(tmp_path_factory.mktemp("synthea"), 3),
        *clinosim_records(3),
    ]
    loaded = LoadedServer(fhir_server, records)
    async with loaded.client() as client:
        for record in records:
            await upload_record(client, record)
    return loaded
