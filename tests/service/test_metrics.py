"""The HTTP metrics are labelled by route template (a patient id never reaches ``/metrics``),
and in multiprocess mode ``/metrics`` sums what every worker process recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import MetricsMiddleware
from service.routes import metrics

ROOT = Path(__file__).resolve().parents[2]
PATIENT = "pt-0042-secret"
TEMPLATE = "/patients/{patient_id}/x"


class Boom(Exception):
    pass


def _app() -> FastAPI:
    app = FastAPI()

    @app.get(TEMPLATE)
    async def patient_route(patient_id: str, fail: bool = False) -> dict[str, str]:
        if fail:
            raise Boom(patient_id)
        return {"id": patient_id}

    app.include_router(metrics.router)
    app.add_middleware(MetricsMiddleware)
    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: the client gets the server's 500, as a real one would.
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
        yield api


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_requests_are_labelled_by_template_and_the_id_never_shows(
    client: httpx.AsyncClient,
) -> None:
    ok = {"route": TEMPLATE, "method": "GET", "status": "200"}
    timed = {"route": TEMPLATE, "method": "GET"}
    before = _sample("ehrmamba_http_requests_total", **ok)
    timed_before = _sample("ehrmamba_http_request_duration_seconds_count", **timed)

    response = await client.get(f"/patients/{PATIENT}/x")

    assert response.json() == {"id": PATIENT}
    assert _sample("ehrmamba_http_requests_total", **ok) == before + 1
    assert _sample("ehrmamba_http_request_duration_seconds_count", **timed) == timed_before + 1
    exposed = await client.get("/metrics")
    assert exposed.status_code == 200
    assert exposed.headers["content-type"].startswith("text/plain")
    assert f'route="{TEMPLATE}"' in exposed.text
    assert PATIENT not in exposed.text


async def test_an_unknown_path_is_unmatched(client: httpx.AsyncClient) -> None:
    labels = {"route": "unmatched", "method": "GET", "status": "404"}
    before = _sample("ehrmamba_http_requests_total", **labels)

    assert (await client.get(f"/nowhere/{PATIENT}")).status_code == 404

    assert _sample("ehrmamba_http_requests_total", **labels) == before + 1
    assert PATIENT not in (await client.get("/metrics")).text


async def test_an_exception_counts_as_500(client: httpx.AsyncClient) -> None:
    labels = {"route": TEMPLATE, "method": "GET", "status": "500"}
    before = _sample("ehrmamba_http_requests_total", **labels)

    assert (await client.get(f"/patients/{PATIENT}/x", params={"fail": "true"})).status_code == 500

    assert _sample("ehrmamba_http_requests_total", **labels) == before + 1


async def test_an_unknown_method_does_not_mint_a_label(client: httpx.AsyncClient) -> None:
    labels = {"route": TEMPLATE, "method": "other", "status": "405"}
    before = _sample("ehrmamba_http_requests_total", **labels)

    assert (await client.request("BREW", f"/patients/{PATIENT}/x")).status_code == 405

    assert _sample("ehrmamba_http_requests_total", **labels) == before + 1


async def test_metrics_is_documented(client: httpx.AsyncClient) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/metrics"]["get"]
    assert "text/plain" in operation["responses"]["200"]["content"]


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def _value(exposition: str, name: str, **labels: str) -> float:
    samples = [
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and sample.labels == labels
    ]
    assert len(samples) == 1, exposition
    return samples[0]


def test_workers_are_summed_and_a_dead_workers_gauge_dropped(tmp_path: Path) -> None:
    # Subprocesses: prometheus_client picks in-memory or file-backed values at import time.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = (
        "import os\n"
        "from service.metrics import QUEUE_DEPTH, QUEUE_REJECTIONS\n"
        "QUEUE_REJECTIONS.labels('full').inc()\n"
        "QUEUE_DEPTH.inc()\n"
        "print(os.getpid())\n"
    )
    first, _ = (int(_python(worker, env)) for _ in range(2))
    scrape = (
        "import sys\n"
        "from service.metrics import metrics_payload\n"
        "sys.stdout.write(metrics_payload()[0].decode())\n"
    )

    both = _python(scrape, env)
    _python(f"from service.metrics import mark_worker_dead\nmark_worker_dead({first})", env)
    one_gone = _python(scrape, env)

    assert _value(both, "ehrmamba_queue_rejections_total", reason="full") == 2
    assert _value(both, "ehrmamba_queue_depth") == 2
    assert _value(one_gone, "ehrmamba_queue_rejections_total", reason="full") == 2
    assert _value(one_gone, "ehrmamba_queue_depth") == 1
