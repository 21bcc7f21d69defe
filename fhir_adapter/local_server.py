"""A local FHIR server process: sekmet-fhir, pinned, in its own virtual environment.

The tests, the demo and the service benchmarks all run against it, so what they show
is what a real server does. ``scripts/install-fhir-server`` installs it (the first caller
does this itself); each server gets a free loopback port and a data folder of its own, so
nothing shares state with a developer's running servers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]  # the repository (an editable install)
VENV = ROOT / ".cache" / "fhir-server-venv"
_START_TIMEOUT_S = 60.0


def install_fhir_server() -> Path:
    """Run the project's install script (idempotent) and return the ``sekmet`` executable."""
    subprocess.run([str(ROOT / "scripts" / "install-fhir-server"), str(VENV)], check=True)
    return VENV / "bin" / "sekmet"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class FhirServer:
    """A running server; ``base_url`` ends in ``/fhir``."""

    base_url: str
    root_url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        log = self.workdir / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def start_fhir_server(
    executable: Path, workdir: Path, *, server_auth: dict[str, Any] | None = None
) -> FhirServer:
    """Start a server in ``workdir`` and wait until its CapabilityStatement answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    root_url = f"http://127.0.0.1:{port}"
    settings = {
        "base_url": f"{root_url}/fhir",
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(workdir / "data"),
        "simulator": {"enabled": False},
        "validation": {"inbound": "off"},
        "log_inbound": False,
        "server_auth": server_auth or {"types": ["none"]},
    }
    config = workdir / "settings.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [str(executable), "serve", "--config", str(config)],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = FhirServer(f"{root_url}/fhir", root_url, process, workdir)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"FHIR server exited at start:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/metadata", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"FHIR server did not start in {_START_TIMEOUT_S} s:\n{server.log_tail()}")
