"""``ehrmamba serve`` as operators run it: a real uvicorn with two worker processes against
the real FHIR server; readiness, predictions, and metrics summed over both workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fhir_adapter.local_server import free_port
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL

_PREDICT_OK = re.compile(
    r'ehrmamba_http_requests_total\{method="POST",route="/patients/\{patient_id\}/predict",'
    r'status="200"\} ([0-9.]+)'
)


def test_two_workers_answer_and_share_their_metrics(
    loaded_fhir: LoadedServer, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "EHRMAMBA_MODEL_PATH": str(MODEL),
        "EHRMAMBA_FHIR_BASE_URL": loaded_fhir.base_url,
        "EHRMAMBA_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
    }
    command = [str(Path(sys.executable).parent / "ehrmamba"), "serve", "--port", str(port),
               "--workers", "2", "--metrics-dir", str(tmp_path / "metrics")]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.5)
        patients = [r.patient_id for r in loaded_fhir.records]
        for patient in patients:  # a connection each, so the kernel spreads them over workers
            response = httpx.post(f"{base}/patients/{patient}/predict", timeout=60)
            assert response.status_code == 200, response.text
        text = httpx.get(f"{base}/metrics").text
        match = _PREDICT_OK.search(text)
        assert match is not None, text[:2000]
        assert float(match.group(1)) == len(patients)
        assert len(list((tmp_path / "metrics").glob("*.db"))) >= 2, "both workers write metrics"
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
