"""More requests than the engine can take: with a tiny queue, a burst of concurrent
predictions is split into answers and quick refusals (429 with ``Retry-After``, without
waiting for the engine); none times out, none is a 500, every answer is recorded and no
refusal is."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.conftest import LoadedServer
from tests.reliability.conftest import metric, outcome, predicted
from tests.service.conftest import ApiFactory

QUEUE_MAX = 1
PER_PATIENT = 8
REJECTED = 'ehrmamba_queue_rejections_total{reason="full"}'
QUEUED = "ehrmamba_queue_wait_seconds_count"
CLIENT_TIMEOUT_S = 120.0  # far beyond any answer: a request that reaches it has hung


async def test_a_burst_beyond_the_queue_gets_quick_429s_and_no_failures(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    small = sorted(loaded_fhir.records, key=lambda r: len(r.resources))[:3]
    patients = [r.patient_id for r in small for _ in range(PER_PATIENT)]
    settings = {"fhir_base_url": loaded_fhir.base_url, "queue_max": QUEUE_MAX,
                "batch_max_size": 1, "batch_max_wait": 0.0}  # fmt: skip
    async with make_api(**settings) as api:
        before = {name: await metric(api, name) for name in (REJECTED, QUEUED)}
        burst = await asyncio.gather(
            *(
                api.post(f"/patients/{p}/predict?forecast=20", timeout=CLIENT_TIMEOUT_S)
                for p in patients
            )
        )  # every one cold: each engine call is a full scan while the others arrive
        statuses = Counter(response.status_code for response in burst)
        assert set(statuses) == {200, 429}, statuses
        for response in burst:
            if response.status_code == 429:
                assert "busy" in outcome(response, 429)
                assert response.headers["retry-after"] == "1"
        assert await metric(api, REJECTED) - before[REJECTED] == statuses[429]
        # Refused at once: only the answered requests ever waited in the engine's queue.
        assert await metric(api, QUEUED) - before[QUEUED] == statuses[200]

        for patient in {r.patient_id for r in small}:
            history = await api.get(f"/patients/{patient}/predictions?limit=500")
            recorded = {row["id"] for row in history.json()["predictions"]}
            mine = {predicted(r)["id"] for r, p in zip(burst, patients, strict=True)
                    if p == patient and r.status_code == 200}  # fmt: skip
            assert recorded == mine, "every answer recorded, no refusal recorded"
        assert (await api.get("/health/ready")).status_code == 200
