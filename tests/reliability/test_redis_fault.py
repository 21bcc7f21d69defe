"""Redis stops and comes back mid-run. Redis is a cache, never a record: while it is gone
every prediction is still answered (and recorded) from process memory, readiness and
``ehrmamba_cache_degraded`` say so, and once it is back the service returns to it by
itself within its retry pause, without a restart or a readiness probe to prompt it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LoadedServer
from tests.reliability.conftest import metric, predicted, small_patient
from tests.reliability.processes import RedisProcess
from tests.service.conftest import ApiFactory

RETRY_PAUSE_S = 5.0  # ResilientCache.retry_after: how long the service serves without Redis
SLACK_S = 5.0  # one prediction and scheduling on a loaded machine
DEGRADED = "ehrmamba_cache_degraded"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


async def test_predictions_survive_redis_stopping_and_return_to_it_when_back(
    make_api: ApiFactory, loaded_fhir: LoadedServer, private_redis: RedisProcess
) -> None:
    patient = small_patient(loaded_fhir)
    settings = {"fhir_base_url": loaded_fhir.base_url, "redis_url": private_redis.url}
    async with make_api(**settings) as api:
        first = predicted(await api.post(f"/patients/{patient}/predict"))
        # The record and the scan state; no confirmation time at the default freshness 0.
        assert private_redis.keys() == 2
        assert (await api.get("/health/ready")).json()["checks"]["cache"] == "redis"

        private_redis.kill()
        gone = [predicted(await api.post(f"/patients/{patient}/predict")) for _ in range(2)]
        assert gone[0]["predictions"] == first["predictions"]
        assert gone[1]["cache"]["state"] == "hit", "process memory stands in for Redis"
        ready = await api.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"]["cache"].startswith(
            "redis unavailable, serving from process memory"
        )
        assert await metric(api, DEGRADED) == 1.0

        private_redis.start()  # the same port, empty
        back_at = time.monotonic()
        answered = [first, *gone]
        while private_redis.keys() == 0:  # predictions alone bring the service back to it
            assert time.monotonic() - back_at < RETRY_PAUSE_S + SLACK_S, "Redis not used again"
            answered.append(predicted(await api.post(f"/patients/{patient}/predict")))
            await asyncio.sleep(0.2)
        assert (await api.get("/health/ready")).json()["checks"]["cache"] == "redis"
        assert await metric(api, DEGRADED) == 0.0

        history = (await api.get(f"/patients/{patient}/predictions?limit=500")).json()
        recorded = [row["id"] for row in history["predictions"]]
        assert recorded == [body["id"] for body in reversed(answered)], "every answer recorded"
