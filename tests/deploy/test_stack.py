"""The compose stack's processes, run without Docker (no engine runs on the machines CI
uses): the sample loader (``deploy/load_samples.py``) fills a local FHIR server from
Bundle and NDJSON files, ``ehrmamba serve`` runs with two workers against it, the
machine's Redis and a fresh PostgreSQL database, and Prometheus (Debian's package,
installed by ``scripts/install-prometheus``) scrapes it with the repository's
configuration, pointed at the loopback port instead of the compose service name.

What compose alone cannot show: readiness names the shared cache and the PostgreSQL
store, a patient cached by one worker is a hit for the other (one Redis, one shared cache
key secret), every answer is a row in PostgreSQL, and Prometheus sees the summed metrics.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fhir_adapter.files import ExportReader
from fhir_adapter.local_server import FhirServer, free_port, start_fhir_server
from fhir_adapter.record import PatientRecord
from tests.service.conftest import MODEL
from tests.support.databases import HOST, PORT, USER, postgres_database, postgres_url
from tests.support.samples import clinosim_records, extract_synthea, require_shared_data

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/0"
PREDICT_ROUTE = "/patients/{patient_id}/predict"
_WAIT_S = 120.0


@dataclass
class Stack:
    fhir: FhirServer
    api: str
    prometheus: str
    database: str
    patients: list[str]
    loader_report: dict[str, Any]


def wait_until(what: str, check: Callable[[], bool], timeout: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def write_samples(folder: Path) -> list[str]:
    """Sample files as an operator would drop them into ./samples: Synthea Bundles, and
    clinosim patients as Bulk Data NDJSON (one file per resource type). Their patient ids."""
    bundles = extract_synthea(folder / "bundles", 2)
    records: list[PatientRecord] = [*ExportReader(bundles).records(), *clinosim_records(2)]
    ndjson = folder / "ndjson"
    ndjson.mkdir()
    lines: dict[str, list[bytes]] = {}
    for record in records[2:]:
        for resource in [record.patient, *record.resources, *record.medications.values()]:
            if resource is not None:
                lines.setdefault(resource["resourceType"], []).append(orjson.dumps(resource))
    for rtype, rows in lines.items():
        (ndjson / f"{rtype}.ndjson").write_bytes(b"\n".join(dict.fromkeys(rows)) + b"\n")
    return [record.patient_id for record in records]


def prometheus_config(port: int) -> dict[str, Any]:
    """The repository's Prometheus configuration with its api job pointed at the loopback
    port, scraping every second; everything else about the job is kept."""
    config: dict[str, Any] = yaml.safe_load(
        (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    )
    api_jobs = [
        job
        for job in config["scrape_configs"]
        if any("api" in sd["names"] for sd in job.get("dns_sd_configs", []))
    ]
    assert len(api_jobs) == 1, config
    job = api_jobs[0]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    job["scrape_interval"] = "1s"
    config["scrape_configs"] = [job]
    return config


def stopped_cleanly(process: subprocess.Popen[bytes], sig: int) -> None:
    """Stop a process as an operator would; it must exit on its own, with status 0."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise AssertionError(f"{process.args!r} ignored signal {sig}") from None
    assert process.returncode == 0, f"{process.args!r} exited with {process.returncode}"


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def stack(sekmet_executable: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_shared_data()
    subprocess.run([str(ROOT / "scripts" / "install-prometheus")], check=True)
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin is not None, "scripts/install-prometheus left no prometheus on PATH"
    work = tmp_path_factory.mktemp("stack")
    patients = write_samples(work / "samples")
    with ExitStack() as running:  # unwinds in reverse: Prometheus, api, database, FHIR
        fhir = start_fhir_server(sekmet_executable, work / "fhir")
        running.callback(fhir.stop)
        loaded = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "load_samples.py"), "--fhir", fhir.base_url,
             "--source", str(work / "samples"), "--wait", "60", "--json"],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        database = running.enter_context(postgres_database())
        api_port, prometheus_port = free_port(), free_port()
        env = {
            **os.environ,
            "EHRMAMBA_MODEL_PATH": str(MODEL),
            "EHRMAMBA_FHIR_BASE_URL": fhir.base_url,
            "EHRMAMBA_FHIR_SERVER_ALLOW": json.dumps([fhir.base_url]),
            "DATABASE_URL": postgres_url(database),  # unprefixed, as compose sets them
            "REDIS_URL": REDIS,
            "EHRMAMBA_CACHE_KEY_SECRET": secrets.token_hex(32),
            "EHRMAMBA_CACHE_TTL": "600",
        }
        api_log = running.enter_context((work / "api.log").open("wb"))
        api = subprocess.Popen(
            [str(Path(sys.executable).with_name("ehrmamba")), "serve", "--host", "127.0.0.1",
             "--port", str(api_port), "--workers", "2", "--metrics-dir", str(work / "metrics")],
            cwd=work, env=env, stdout=api_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        running.callback(stopped_cleanly, api, signal.SIGINT)  # as Ctrl-C or compose stop
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(api_port)))
        prometheus_log = running.enter_context((work / "prometheus.log").open("wb"))
        prometheus = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}",
             f"--storage.tsdb.path={work / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            cwd=work, stdout=prometheus_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        running.callback(stopped_cleanly, prometheus, signal.SIGTERM)
        api_url = f"http://127.0.0.1:{api_port}"
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"

        def api_ready() -> bool:
            assert api.poll() is None, tail(work / "api.log")
            return answers(f"{api_url}/health/ready")

        def prometheus_ready() -> bool:
            assert prometheus.poll() is None, tail(work / "prometheus.log")
            return answers(f"{prometheus_url}/-/ready")

        wait_until("the api is ready", api_ready)
        wait_until("prometheus is ready", prometheus_ready)
        yield Stack(fhir, api_url, prometheus_url, database, patients, json.loads(loaded.stdout))


def test_the_loader_reports_what_it_loaded(stack: Stack) -> None:
    assert stack.loader_report["patients"] == len(stack.patients) == 4
    assert stack.loader_report["resources"] > 4
    for patient in stack.patients:  # with the ids the files gave them
        assert httpx.get(f"{stack.fhir.base_url}/Patient/{patient}").status_code == 200


def test_readiness_names_the_shared_cache_and_the_postgresql_store(stack: Stack) -> None:
    ready = httpx.get(f"{stack.api}/health/ready").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["cache"] == "redis"
    assert ready["checks"]["store"] == "postgresql"


def test_predictions_are_shared_between_workers_and_stored(stack: Stack) -> None:
    ids = []
    for patient in stack.patients:  # a connection each, so the kernel spreads them out
        answer = httpx.post(f"{stack.api}/patients/{patient}/predict", timeout=120)
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["id"])
    repeats = [
        httpx.post(f"{stack.api}/patients/{stack.patients[0]}/predict", timeout=120).json()
        for _ in range(4)
    ]
    # Whichever worker answers, the record and scan state come from Redis.
    assert {r["cache"]["state"] for r in repeats} == {"hit"}, [r["cache"] for r in repeats]
    ids += [r["id"] for r in repeats]

    with psycopg.connect(host=HOST, port=PORT, user=USER, dbname=stack.database) as db:
        rows = db.execute(
            "SELECT id, patient_id, source, model_name FROM predictions WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    assert sorted(row[0] for row in rows) == sorted(ids)
    assert {row[1] for row in rows} == set(stack.patients)
    assert {(row[2], row[3]) for row in rows} == {("api", "ehrmamba-compact")}


def test_metrics_are_served_and_scraped_by_prometheus(stack: Stack) -> None:
    answer = httpx.post(f"{stack.api}/patients/{stack.patients[1]}/predict", timeout=120)
    assert answer.status_code == 200, answer.text
    exposition = httpx.get(f"{stack.api}/metrics").text
    served = _predictions_answered(exposition)
    assert served >= 1
    assert "ehrmamba_model_info" in exposition

    def api_target_up() -> bool:
        targets = httpx.get(f"{stack.prometheus}/api/v1/targets").json()["data"]
        return any(t["health"] == "up" for t in targets["activeTargets"])

    wait_until("prometheus scrapes the api", api_target_up, timeout=60)
    query = f'sum(ehrmamba_http_requests_total{{route="{PREDICT_ROUTE}",status="200"}})'

    def scraped() -> float:
        result = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": query}).json()
        values = result["data"]["result"]
        return float(values[0]["value"][1]) if values else 0.0

    wait_until("prometheus has the summed predict count", lambda: scraped() >= served, 60)
    assert scraped() == served


def _predictions_answered(exposition: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "ehrmamba_http_requests_total"
        and sample.labels.get("route") == PREDICT_ROUTE
        and sample.labels.get("status") == "200"
    )
