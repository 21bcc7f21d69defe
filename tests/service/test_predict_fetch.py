"""How a warm predict reaches the FHIR server (real server processes, real store): one
client per process, one batch request per warm call, separate requests for a server that
refuses batch, no request at all within EHRMAMBA_FHIR_FRESHNESS, and one audit event per
call written with its prediction."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from fhir_adapter.client import FhirClient
from service.app import create_app
from service.cache import patient_key
from service.settings import Settings
from tests.conftest import LoadedServer
from tests.reliability.fault_server import FaultServer
from tests.service.conftest import MODEL
from tests.support.fhir_writes import delete_resources, new_visit, put_resources

Served = tuple[FastAPI, httpx.AsyncClient]


def _visit(patient: str, name: str) -> list[dict[str, Any]]:
    """A new visit an hour ago, with a lab: data that extends the patient's record."""
    return new_visit(
        patient, f"{name}-{secrets.token_hex(3)}", datetime.now(UTC) - timedelta(hours=1)
    )


@asynccontextmanager
async def _served(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = {"model_path": MODEL, "database_url": f"sqlite:///{tmp_path / 'store.db'}"}
    app = create_app(Settings(**{**settings, **overrides}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as api:
            yield app, api


async def _predict(api: httpx.AsyncClient, patient: str) -> dict[str, Any]:
    response = await api.post(f"/patients/{patient}/predict")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _probabilities(body: dict[str, Any]) -> dict[str, float]:
    return {task: answer["probability"] for task, answer in body["predictions"].items()}


async def _fhir_requests(api: httpx.AsyncClient) -> Counter[str]:
    """FHIR requests so far by method, as the FHIR client's request observer counted them
    (``ehrmamba_fhir_request_duration_seconds``)."""
    counts: Counter[str] = Counter()
    text = (await api.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ehrmamba_fhir_request_duration_seconds_count":
                counts[sample.labels["method"]] += int(sample.value)
    return counts


async def test_a_warm_predict_is_one_batch_request_on_the_process_client(
    tmp_path: Path, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[2].patient_id
    async with _served(tmp_path, fhir_base_url=loaded_fhir.base_url) as (app, api):
        client = app.state.service.fhir
        assert isinstance(client, FhirClient)
        before = await _fhir_requests(api)
        cold = await _predict(api, patient)
        assert cold["cache"]["record"] == "cold"
        after_cold = await _fhir_requests(api)
        assert after_cold["GET"] - before["GET"] >= 7, "a cold read: the Patient and 6 searches"
        assert after_cold["POST"] == before["POST"]
        for _ in range(2):
            warm = await _predict(api, patient)
            assert warm["cache"] == {"record": "incremental", "state": "hit", "scanned_tokens": 0}
            # From the cached state: the same arithmetic on other batch shapes (float32 bits).
            assert _probabilities(warm) == pytest.approx(_probabilities(cold), abs=1e-6)
        after_warm = await _fhir_requests(api)
        assert after_warm - after_cold == Counter({"POST": 2}), "one batch per warm call"
        assert app.state.service.fhir is client, "one client for the process's life"
        assert client.batch_supported is True
    assert app.state.service.fhir is None
    assert client._http.is_closed, "closed when the service stops"


async def test_new_data_reaches_a_warm_predict_through_the_batch(
    tmp_path: Path, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[-2].patient_id
    visit = new_visit(
        patient, f"batch-{secrets.token_hex(3)}", datetime.now(UTC) - timedelta(hours=1)
    )
    async with loaded_fhir.client() as writer:
        try:
            async with _served(tmp_path, fhir_base_url=loaded_fhir.base_url) as (_, api):
                first = await _predict(api, patient)
                await put_resources(writer, visit)
                before = await _fhir_requests(api)
                grown = await _predict(api, patient)
                # one batch of probes, one of the searches of the two types that changed
                assert await _fhir_requests(api) - before == Counter({"POST": 2})
            assert grown["cache"]["record"] == "incremental"
            assert grown["cache"]["state"] == "extended"
            assert grown["data"]["events"] > first["data"]["events"]
            async with _served(tmp_path / "cold", fhir_base_url=loaded_fhir.base_url) as (
                _,
                cold_api,
            ):
                cold = await _predict(cold_api, patient)
            assert cold["cache"]["record"] == "cold"
            assert cold["data"] == grown["data"]
            assert _probabilities(cold) == pytest.approx(_probabilities(grown), abs=1e-5)
        finally:
            await delete_resources(writer, visit)


async def test_a_fhir_server_that_refuses_batch_gets_separate_requests(
    tmp_path: Path, loaded_fhir: LoadedServer
) -> None:
    """The fault server forwards GETs to the real server and, like a server without batch,
    answers a POST with 405: the client asks once, then reads with separate requests."""
    patient = loaded_fhir.records[0].patient_id
    with FaultServer(loaded_fhir.base_url) as refusing:
        async with _served(tmp_path, fhir_base_url=refusing.base_url) as (app, api):
            first = await _predict(api, patient)
            before = await _fhir_requests(api)
            for _ in range(2):
                refusing.seen.clear()
                warm = await _predict(api, patient)
                assert warm["cache"]["record"] == "incremental"
                assert _probabilities(warm) == pytest.approx(_probabilities(first), abs=1e-6)
                paths = sorted(seen.split("?")[0] for seen in refusing.seen)
                assert paths == sorted(
                    ["/fhir/Patient/" + patient]
                    + [f"/fhir/{t}" for t in ("Condition", "Encounter", "MedicationAdministration",
                                              "MedicationRequest", "Observation", "Procedure")]
                )  # fmt: skip
            assert (await _fhir_requests(api))["POST"] - before["POST"] == 1, "refusal remembered"
            assert app.state.service.fhir.batch_supported is False


async def test_within_the_freshness_window_the_cached_record_answers_and_says_so(
    tmp_path: Path, loaded_fhir: LoadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = loaded_fhir.records[1].patient_id
    visit = new_visit(
        patient, f"fresh-{secrets.token_hex(3)}", datetime.now(UTC) - timedelta(hours=1)
    )
    settings = {"fhir_base_url": loaded_fhir.base_url, "fhir_freshness": 60}
    later = 0.0  # seconds the service's wall clock is ahead of the real one
    monkeypatch.setattr("service.predicting.wall_clock", lambda: time.time() + later)
    async with loaded_fhir.client() as writer:
        try:
            async with _served(tmp_path, **settings) as (_, api):
                first = await _predict(api, patient)
                assert first["cache"]["record"] == "cold"
                await put_resources(writer, visit)
                before = await _fhir_requests(api)
                fresh = await _predict(api, patient)
                assert await _fhir_requests(api) == before, "the FHIR server is not asked"
                assert fresh["cache"] == {"record": "fresh-cache", "state": "hit",
                                          "scanned_tokens": 0}  # fmt: skip
                assert fresh["data"] == first["data"], "what changed since is not in it"
                assert _probabilities(fresh) == pytest.approx(_probabilities(first), abs=1e-6)
                later = 61.0
                checked = await _predict(api, patient)
                assert checked["cache"]["record"] == "incremental"
                assert checked["cache"]["state"] == "extended"
                assert (await _fhir_requests(api))["POST"] == before["POST"] + 2  # probes, searches
                again = await _predict(api, patient)
                assert again["cache"]["record"] == "fresh-cache", "confirmed just now"
                assert again["data"] == checked["data"]
        finally:
            await delete_resources(writer, visit)


async def test_with_freshness_zero_no_confirmation_is_read_or_written(
    tmp_path: Path, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[0].patient_id
    async with _served(tmp_path, fhir_base_url=loaded_fhir.base_url) as (app, api):
        assert app.state.service.settings.fhir_freshness == 0
        cold, warm = await _predict(api, patient), await _predict(api, patient)
        assert (cold["cache"]["record"], warm["cache"]["record"]) == ("cold", "incremental")
        patients = app.state.service.patients
        base = app.state.service.fhir.base_url
        assert await patients.cache.get(patient_key(patients.secret, base, patient, "record"))
        confirmed = patient_key(patients.secret, base, patient, "checked")
        assert await patients.cache.get(confirmed) is None, "a confirmation nobody would trust"


async def test_each_call_writes_one_audit_event_with_its_prediction(
    tmp_path: Path, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[0].patient_id
    async with _served(tmp_path, fhir_base_url=loaded_fhir.base_url) as (app, api):
        answers = [await _predict(api, patient) for _ in range(2)]
        missing = await api.post("/patients/no-such-patient/predict")
        assert missing.status_code == 404
        store = app.state.service.store
        events = await store.audit_events()
        recorded = await store.predictions(loaded_fhir.base_url, patient)
    assert [(e.action, e.patient_id, e.status, e.outcome) for e in events] == [
        ("predict", "no-such-patient", 404, "not-found"),
        ("predict", patient, 200, "ok"),
        ("predict", patient, 200, "ok"),
    ]
    assert {e.fhir_base for e in events} == {loaded_fhir.base_url}
    assert [r.id for r in recorded] == [a["id"] for a in reversed(answers)]
