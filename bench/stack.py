"""The served stack the HTTP benchmarks measure, as real processes on loopback.

A sekmet FHIR server loaded with shared patients under their own ids, ``ehrmamba serve``
(uvicorn, one or more workers) reading it, and optionally a private ``redis-server`` as
the shared cache: the layout of a hospital deployment on one machine, so a number taken
here includes HTTP and JSON on both hops, the FHIR server's searches, the cache, the store
write and the event loop between them. Every process is a child of the benchmark, keeps
its files in one temporary folder, and stops when the run ends or fails; the machine's own
Redis, PostgreSQL and FHIR servers are never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import httpx
import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families

from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.files import ExportReader
from fhir_adapter.local_server import (
    FhirServer,
    free_port,
    install_fhir_server,
    start_fhir_server,
)
from fhir_adapter.record import PatientRecord
from fhir_adapter.upload import upload_record
from service.cds.client_token import ClientKey

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SYNTHEA = "synthea-r4/bundles.tar.gz"
CLINOSIM = "clinosim-us/ndjson.tar.gz"
ISSUER = "https://ehr.bench.example"  # the CDS client the service trusts when given a key
PREDICT = "/patients/{patient_id}/predict"
_READY_TIMEOUT_S = 180.0
_STARTED = b"Application startup complete."  # uvicorn logs it once per worker


def load_records(data: Path, count: int) -> list[PatientRecord]:
    """The first patients (by id, which is random in both sets) of the Synthea bundles and
    the clinosim export, half from each: no patient is chosen for being small."""
    records: list[PatientRecord] = []
    for name, wanted in ((SYNTHEA, count - count // 2), (CLINOSIM, count // 2)):
        path = data / name
        if not path.is_file():
            raise FileNotFoundError(f"shared data missing: {path}")
        records.extend(islice(ExportReader(path).records(), wanted))
    return records


@dataclass
class Stack:
    """A running stack: where to call it and what it holds."""

    fhir: FhirServer
    service: Service
    records: list[PatientRecord]
    workdir: Path
    api_key: str | None

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def patient_ids(self) -> list[str]:
        return [r.patient_id for r in self.records]

    @property
    def headers(self) -> dict[str, str]:
        """What every ``/patients`` call must carry."""
        return {} if self.api_key is None else {"X-API-Key": self.api_key}

    def answered_predictions(self) -> int:
        """Predict requests the service has answered so far, any status, summed over its
        workers (its own ``ehrmamba_http_requests_total``)."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).raise_for_status().text
        return round(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "ehrmamba_http_requests_total"
                and sample.labels["route"] == PREDICT
            )
        )

    def settle(self, at_least: int, quiet_s: float = 2.0, limit_s: float = 120.0) -> int:
        """Wait until the service has answered ``at_least`` predicts in all, then until
        that count stays the same for ``quiet_s`` (a closed-loop generator leaves requests
        in flight when it stops; their number is not known). Returns the count, which is
        below ``at_least`` only if some never got an answer within ``limit_s``."""
        deadline = time.monotonic() + limit_s
        last = self.answered_predictions()
        while last < at_least and time.monotonic() < deadline:
            time.sleep(0.2)
            last = self.answered_predictions()
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            now = self.answered_predictions()
            if now == last:
                break
            last = now
        return last

    def warm(self) -> None:
        """Predict every patient once, one at a time: afterwards each one's record and
        scan state are cached. A new connection per call spreads the calls over the
        workers (the kernel hands each accepted connection to one of them), so each one
        has loaded and scored before anything is measured."""
        started = time.perf_counter()
        headers = {**self.headers, "Connection": "close"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as http:
            for patient in self.patient_ids:
                http.post(PREDICT.format(patient_id=patient)).raise_for_status()
        say(f"warmed {len(self.records)} patients in {time.perf_counter() - started:.0f} s")

    def recorded_predictions(self) -> int:
        """Rows in the store's prediction table, read from its SQLite file: the check that
        every answered prediction was recorded and no refused one was."""
        uri = f"file:{self.workdir / 'service' / 'store.db'}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM predictions").fetchone()[0])


@contextmanager
def served(
    records: list[PatientRecord],
    *,
    workers: int = 1,
    redis_cache: bool = False,
    api_key: str | None = None,
    cds_key: ClientKey | None = None,
) -> Iterator[Stack]:
    """Start the FHIR server, upload ``records`` while the service loads its model, and
    yield once every worker is ready. With ``redis_cache`` the workers share a private
    Redis (and one cache key secret, or they could not read each other's entries);
    otherwise each keeps its in-process cache. With ``api_key`` the ``/patients`` routes
    need it; with ``cds_key`` the service trusts that CDS client (``ISSUER``)."""
    with tempfile.TemporaryDirectory(prefix="ehrmamba-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        fhir = start_fhir_server(install_fhir_server(), work / "fhir")
        stack.callback(fhir.stop)
        settings = {
            "EHRMAMBA_FHIR_BASE_URL": fhir.base_url,
            "EHRMAMBA_FHIR_SERVER_ALLOW": json.dumps([fhir.base_url]),
        }
        if redis_cache:
            cache = RedisServer.start(work / "redis")
            stack.callback(cache.stop)
            settings["EHRMAMBA_REDIS_URL"] = cache.url
            settings["EHRMAMBA_CACHE_KEY_SECRET"] = secrets.token_urlsafe(32)
        if api_key is not None:
            settings["EHRMAMBA_API_KEYS"] = json.dumps([api_key])
        service = Service.start(work / "service", settings, workers, cds_key)
        stack.callback(service.stop)
        asyncio.run(upload(fhir.base_url, records))
        service.wait_ready()
        yield Stack(fhir, service, records, work, api_key)


async def upload(fhir_base: str, records: list[PatientRecord]) -> None:
    """Every record onto the FHIR server under its own ids."""
    started = time.perf_counter()
    async with FhirClient(FhirClientConfig(base_url=fhir_base)) as fhir:
        resources = 0
        for record in records:
            resources += await upload_record(fhir, record)
    say(f"loaded {len(records)} patients ({resources} resources) in "
        f"{time.perf_counter() - started:.0f} s")  # fmt: skip


class Service:
    """``ehrmamba serve`` in its own process, configured only by the variables set here."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path, workers: int):
        self.process = process
        self.url = url
        self.log = log
        self.workers = workers

    @classmethod
    def start(
        cls,
        workdir: Path,
        settings: dict[str, str],
        workers: int = 1,
        cds_key: ClientKey | None = None,
    ) -> Service:
        """Defaults for everything not in ``settings`` (``EHRMAMBA_*`` variables), the
        committed model, and a SQLite store in ``workdir``."""
        workdir.mkdir(parents=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("EHRMAMBA_") and k not in ("DATABASE_URL", "REDIS_URL")
        }  # the settings read those two without the prefix too
        env |= {
            "EHRMAMBA_MODEL_PATH": str(ROOT / "models" / "compact"),
            "EHRMAMBA_DATABASE_URL": f"sqlite:///{workdir / 'store.db'}",
        }
        if cds_key is not None:
            jwks = workdir / "ehr-jwks.json"
            jwks.write_bytes(orjson.dumps(cds_key.public_jwks()))
            issuers = [{"iss": ISSUER, "jwks_file": str(jwks)}]
            env["EHRMAMBA_CDS_ISSUERS"] = json.dumps(issuers)
        env |= settings
        port = free_port()
        log = workdir / "service.log"
        command = [str(Path(sys.executable).with_name("ehrmamba")), "serve",
                   "--port", str(port), "--workers", str(workers)]  # fmt: skip
        with log.open("wb") as out:  # the child keeps its own descriptor
            process = subprocess.Popen(
                command,
                cwd=workdir,  # no developer's .env is read
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(process, f"http://127.0.0.1:{port}", log, workers)

    def wait_ready(self) -> None:
        """Until every worker has started (each logs it once; readiness asked over HTTP
        reaches only one of them) and the service says it is ready."""

        def ready() -> bool:
            if self.log.read_bytes().count(_STARTED) < self.workers:
                return False
            try:
                return httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(ready, self.process, "the service", self._log_tail)

    def stop(self) -> None:
        _stop(self.process)

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


class RedisServer:
    """A private ``redis-server`` without persistence on a free loopback port."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"

    @classmethod
    def start(cls, workdir: Path) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("the benchmark needs redis-server on PATH (Debian: redis-server)")
        workdir.mkdir(parents=True)
        port = free_port()
        command = [executable, "--port", str(port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
        with (workdir / "redis.log").open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server = cls(process, port)

        def answers() -> bool:
            try:
                with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        _wait(answers, process, "redis-server", lambda: "")
        return server

    def stop(self) -> None:
        _stop(self.process)


def _wait(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    what: str,
    log_tail: Callable[[], str],
) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start:\n{log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready in {_READY_TIMEOUT_S} s:\n{log_tail()}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def say(message: str) -> None:
    """Progress and context lines go to stderr, so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)
