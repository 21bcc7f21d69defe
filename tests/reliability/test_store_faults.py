"""The store fails: PostgreSQL stops, or the disk under the SQLite file fills up.

A prediction that cannot be recorded is not answered: the call fails loudly with a 503 and
``Retry-After`` (never a 500, never an unrecorded 200), and once the database can write
again predictions are recorded again, with nothing answered missing from the history.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import LoadedServer
from tests.reliability.conftest import metric, outcome, predicted, small_patient
from tests.reliability.processes import PostgresProcess, fill, small_filesystem
from tests.service.conftest import ApiFactory

UNRECORDED = "the prediction could not be recorded; nothing was answered"
RECORD_ERRORS = 'ehrmamba_store_errors_total{operation="record_prediction"}'
AUDIT_ERRORS = 'ehrmamba_store_errors_total{operation="audit"}'


@pytest.fixture
def private_postgres() -> Iterator[PostgresProcess]:
    server = PostgresProcess()
    try:
        server.start()
        yield server
    finally:
        server.close()


async def _refused(api: httpx.AsyncClient, patient: str) -> float:
    """Ask for a prediction the store cannot record: a 503 with Retry-After (asserted);
    the seconds it took."""
    started = time.monotonic()
    response = await api.post(f"/patients/{patient}/predict")
    assert outcome(response, 503) == UNRECORDED
    assert response.headers["retry-after"] == "5"
    return time.monotonic() - started


async def _recorded(api: httpx.AsyncClient, patient: str) -> list[int]:
    response = await api.get(f"/patients/{patient}/predictions")
    assert response.status_code == 200, response.text
    return [row["id"] for row in response.json()["predictions"]]


async def test_a_stopped_postgresql_refuses_answers_then_records_again(
    make_api: ApiFactory, loaded_fhir: LoadedServer, private_postgres: PostgresProcess
) -> None:
    patient = small_patient(loaded_fhir)
    settings = {"fhir_base_url": loaded_fhir.base_url, "database_url": private_postgres.url}
    async with make_api(**settings) as api:
        first = predicted(await api.post(f"/patients/{patient}/predict"))
        record_errors = await metric(api, RECORD_ERRORS)

        private_postgres.stop()
        assert await _refused(api, patient) < 5.0, "a refused connection fails at once"
        assert await metric(api, RECORD_ERRORS) == record_errors + 1
        history = await api.get(f"/patients/{patient}/predictions")
        assert "unavailable" in outcome(history, 503)

        private_postgres.start()  # the same port and data; the pool reconnects by itself
        again = predicted(await api.post(f"/patients/{patient}/predict"))
        assert await _recorded(api, patient) == [again["id"], first["id"]]


async def test_a_full_disk_under_sqlite_refuses_answers_then_records_again(
    make_api: ApiFactory, loaded_fhir: LoadedServer, tmp_path: Path
) -> None:
    patient = small_patient(loaded_fhir)
    with small_filesystem(tmp_path / "var", "4m") as var:
        database = var / "ehrmamba.db"
        settings = {"fhir_base_url": loaded_fhir.base_url, "database_url": f"sqlite:///{database}"}
        async with make_api(**settings) as api:
            first = predicted(await api.post(f"/patients/{patient}/predict"))
            audit_errors = await metric(api, AUDIT_ERRORS)

            filler = fill(var)
            await _refused(api, patient)
            assert await metric(api, AUDIT_ERRORS) == audit_errors + 1, "audit write failed too"
            history = await api.get(f"/patients/{patient}/predictions")
            assert outcome(history, 503) == "the audit trail could not be written"
            with (  # what the store ran into
                closing(sqlite3.connect(database)) as probe,
                pytest.raises(sqlite3.OperationalError) as full,
            ):
                probe.execute("CREATE TABLE probe (x)")
            assert full.value.sqlite_errorname == "SQLITE_FULL"

            filler.unlink()
            again = predicted(await api.post(f"/patients/{patient}/predict"))
            assert await _recorded(api, patient) == [again["id"], first["id"]]


async def test_a_store_down_at_start_is_retried_until_it_answers(
    make_api: ApiFactory,
    loaded_fhir: LoadedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("service.app.STORE_RETRY_S", 0.1)
    blocker = tmp_path / "not-yet-a-folder"
    blocker.write_text("")  # the database's folder cannot be made while this file is there
    url = f"sqlite:///{blocker / 'store.db'}"
    async with make_api(fhir_base_url=loaded_fhir.base_url, database_url=url) as api:
        down = await api.get("/health/ready")
        assert down.status_code == 503
        assert "store unavailable" in down.json()["reason"]
        patient = small_patient(loaded_fhir)
        assert "not ready" in outcome(await api.post(f"/patients/{patient}/predict"), 503)
        blocker.unlink()  # the volume is mounted now
        deadline = time.monotonic() + 10
        while (await api.get("/health/ready")).status_code != 200:
            assert time.monotonic() < deadline, "the store was never opened"
            await anyio.sleep(0.1)
        assert predicted(await api.post(f"/patients/{patient}/predict"))["id"] >= 1
