"""The predict path end to end with its cache and store: real FHIR server, real Redis, real
SQLite and PostgreSQL. A repeated call reuses the cached record and scan state; new data
is fetched incrementally and scanned from the cached state; every answer equals a cold
recompute; every answer is recorded."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from fhir_adapter.client import FhirClient
from fhir_adapter.normalize import build_timeline
from model.artifact import load_artifact
from model.tasks import Task
from service.scoring import Scorer
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL, ApiFactory
from tests.support.fhir_writes import delete_resources, new_visit, put_resources

REDIS = "redis://127.0.0.1:6379/0"


def _probabilities(body: dict[str, Any]) -> dict[str, float]:
    return {task: answer["probability"] for task, answer in body["predictions"].items()}


async def _predict(api: httpx.AsyncClient, patient: str, **params: str | int) -> dict[str, Any]:
    response = await api.post(f"/patients/{patient}/predict", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
async def fhir(loaded_fhir: LoadedServer) -> AsyncIterator[FhirClient]:
    async with loaded_fhir.client() as client:
        yield client


async def test_repeat_and_incremental_calls_equal_a_cold_recompute(
    make_api: ApiFactory, loaded_fhir: LoadedServer, fhir: FhirClient, database_url: str
) -> None:
    patient = loaded_fhir.records[-1].patient_id
    tag = secrets.token_hex(3)
    added = new_visit(patient, f"extends-{tag}", datetime.now(UTC) - timedelta(hours=3))
    backdated = new_visit(patient, f"backdated-{tag}", datetime(1990, 1, 1, tzinfo=UTC))
    settings = {"fhir_base_url": loaded_fhir.base_url, "database_url": database_url}
    try:
        async with make_api(**settings) as api:
            first = await _predict(api, patient, forecast=2)
            assert first["cache"] == {"record": "cold", "state": "miss",
                                      "scanned_tokens": first["data"]["tokens"]}  # fmt: skip

            again = await _predict(api, patient, forecast=2)
            assert again["cache"] == {"record": "incremental", "state": "hit", "scanned_tokens": 0}
            # From the cache: the same arithmetic on other batch shapes, to float32 rounding.
            assert _probabilities(again) == pytest.approx(_probabilities(first), abs=1e-6)
            assert again["forecast"] == first["forecast"]

            await put_resources(fhir, added)
            grown = await _predict(api, patient, forecast=2)
            assert grown["cache"]["record"] == "incremental"
            assert grown["cache"]["state"] == "extended"
            new_tokens = grown["data"]["tokens"] - first["data"]["tokens"]
            assert 0 < grown["cache"]["scanned_tokens"] == new_tokens
            assert grown["data"]["resources"]["Observation"] == (
                first["data"]["resources"]["Observation"] + 1
            )

            await put_resources(fhir, backdated)
            rewritten = await _predict(api, patient, forecast=2)
            assert rewritten["cache"]["state"] == "miss", "backdated data cannot extend a scan"
            assert rewritten["cache"]["scanned_tokens"] == rewritten["data"]["tokens"]

            history = (await api.get(f"/patients/{patient}/predictions")).json()["predictions"]
            assert [h["id"] for h in history] == [
                rewritten["id"],
                grown["id"],
                again["id"],
                first["id"],
            ]
            assert history[1]["predictions"] == grown["predictions"]

        async with make_api(**settings) as cold_api:  # a new process: nothing cached
            cold = await _predict(cold_api, patient, forecast=2)
        assert cold["cache"]["state"] == "miss"
        assert _probabilities(cold) == pytest.approx(_probabilities(rewritten), abs=1e-5)
        assert [s["token"] for s in cold["forecast"]] == [s["token"] for s in rewritten["forecast"]]

        scorer = Scorer(load_artifact(MODEL))  # and the engine on the raw record, directly
        timeline = build_timeline(await fhir.fetch_patient(patient))
        direct = scorer.score(timeline, scorer.tasks, 0, datetime.now(UTC))
        for task, p in _probabilities(rewritten).items():
            assert p == pytest.approx(direct.probabilities[Task(task)], abs=1e-5)
    finally:
        await delete_resources(fhir, [*added, *backdated])


async def test_redis_is_shared_across_replicas_and_its_loss_is_survived(
    make_api: ApiFactory, loaded_fhir: LoadedServer, database_url: str
) -> None:
    patient = loaded_fhir.records[0].patient_id
    shared = {
        "fhir_base_url": loaded_fhir.base_url,
        "database_url": database_url,
        "redis_url": REDIS,
        "cache_key_secret": secrets.token_hex(16),
    }
    async with make_api(**shared) as one:
        first = await _predict(one, patient)
        assert first["cache"]["record"] == "cold"
        ready = (await one.get("/health/ready")).json()
        assert ready["checks"]["cache"] == "redis"
    async with make_api(**shared) as two:  # another replica, same Redis and key
        second = await _predict(two, patient)
    assert second["cache"] == {"record": "incremental", "state": "hit", "scanned_tokens": 0}
    assert _probabilities(second) == pytest.approx(_probabilities(first), abs=1e-6)

    gone = {**shared, "redis_url": "redis://127.0.0.1:9/0"}  # nothing listens there
    async with make_api(**gone) as lonely:
        ready = await lonely.get("/health/ready")
        assert ready.status_code == 200
        assert "redis unavailable" in ready.json()["checks"]["cache"]
        served = await _predict(lonely, patient)
        assert _probabilities(served) == pytest.approx(_probabilities(first), abs=1e-6)
        again = await _predict(lonely, patient)
        assert again["cache"]["state"] == "hit", "the in-process cache stands in"
        metrics = (await lonely.get("/metrics")).text
        assert "ehrmamba_cache_degraded 1.0" in metrics
