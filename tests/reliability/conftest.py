"""Fault scenarios against the real service app: the app fixture of the service tests, and
what every scenario asks of an answer."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import LoadedServer
from tests.service.conftest import make_api

__all__ = ["make_api", "metric", "outcome", "predicted", "same_predictions", "small_patient"]


def small_patient(loaded: LoadedServer) -> str:
    """The loaded patient with the fewest resources: the quickest to fetch and scan cold."""
    return min(loaded.records, key=lambda r: len(r.resources)).patient_id


def outcome(response: httpx.Response, status: int) -> str:
    """The diagnostics of an OperationOutcome answer with ``status`` (asserted)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    diagnostics: str = body["issue"][0]["diagnostics"]
    return diagnostics


def predicted(response: httpx.Response) -> dict[str, Any]:
    """The body of a successful, recorded prediction (asserted)."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert isinstance(body["id"], int)
    return body


def same_predictions(a: dict[str, Any], b: dict[str, Any], tolerance: float = 1e-6) -> None:
    """Assert two answers' predictions agree: the same tasks and risk bands, probabilities
    within ``tolerance``. A score continued from a cached state and one from a fresh scan
    do the same arithmetic on differently shaped batches, so the matrix library may sum in
    another order and differ in the last float32 bits; anything larger is a real change."""
    assert a.keys() == b.keys()
    for task, prediction in a.items():
        assert prediction["risk"] == b[task]["risk"], task
        assert abs(prediction["probability"] - b[task]["probability"]) <= tolerance, task


async def metric(api: httpx.AsyncClient, sample: str) -> float:
    """The value of one sample (``name{labels}`` as exposed) on ``/metrics``: 0 for a
    labelled series not yet touched (Prometheus lists none), if its metric is there."""
    text = (await api.get("/metrics")).text
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    family = sample.partition("{")[0]
    assert f"# TYPE {family} " in text, f"{family} is not on /metrics"
    return 0.0
