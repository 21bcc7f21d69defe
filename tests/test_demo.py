"""``ehrmamba demo`` as a newcomer meets it: a real process on a free port whose printed
calls are run exactly as printed, then Ctrl-C. The first run on a machine draws the
samples with clinosim and loads them into the FHIR server (about two minutes, kept in
``.cache/demo``); later runs start in seconds."""

from __future__ import annotations

import json
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cli.demo import CACHE, READY
from fhir_adapter.local_server import free_port

EHRMAMBA = Path(sys.executable).with_name("ehrmamba")
FIRST_RUN_S = 600.0  # drawing and loading the samples, once per machine


class Demo:
    """The running command and every line it has printed so far."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} in {timeout} s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"the demo ended before {prefix!r}:\n{self.output}")
            self.lines.append(line)

    def drain(self) -> None:
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def commands(self) -> list[str]:
        return [line.split("$ ", 1)[1] for line in self.lines if line.startswith("  $ ")]

    def url_after(self, label: str) -> str:
        """The URL printed after ``label`` at the start of a line."""
        found = re.search(rf"^{label}\s*(http://\S+)", self.output, re.MULTILINE)
        assert found, self.output
        return found.group(1)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    port = free_port()
    process = subprocess.Popen(
        [str(EHRMAMBA), "demo", "--port", str(port)],
        cwd=tmp_path,  # nothing may depend on where it is started from
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Demo(process)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _run(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        shlex.split(command), capture_output=True, text=True, timeout=120, check=False
    )


def _port_open(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as sock:
        return sock.connect_ex((parts.hostname, parts.port)) == 0


def test_demo_answers_the_calls_it_prints_and_stops_on_ctrl_c(demo: Demo) -> None:
    demo.wait_for(READY, FIRST_RUN_S)
    demo.wait_for("Ctrl-C", 10)
    service, fhir = demo.url_after(f"{READY}:"), demo.url_after("  FHIR server")
    predict, discovery, hook = demo.commands()
    assert predict.startswith("curl -X POST")
    assert hook.split()[1:3] == ["demo", "hook"]

    answer = _run(predict)
    assert answer.returncode == 0, answer.stderr
    scored = json.loads(answer.stdout)
    risks = {task: p["risk"] for task, p in scored["predictions"].items()}
    assert "length_of_stay" in risks, "the example patient is one still in hospital"
    assert len(scored["forecast"]) == 5

    answer = _run(discovery)
    assert answer.returncode == 0, answer.stderr
    hooks = {s["hook"] for s in json.loads(answer.stdout)["services"]}
    assert hooks == {"patient-view", "encounter-start", "encounter-discharge"}

    # Twice: each call must sign a new JWT, since the service refuses one seen before.
    for _ in range(2):
        answer = _run(hook)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        shown = sorted(re.findall(r"^\[(\w+)\] ", answer.stdout, re.MULTILINE))
        expected = sorted(
            {"high": "critical", "moderate": "warning"}[risk]
            for risk in risks.values()
            if risk != "low"
        )
        assert shown == expected, answer.stdout
        if not expected:
            assert "No cards" in answer.stdout

    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(timeout=60) == 0, demo.output
    demo.drain()
    assert demo.lines[-1] == "Stopped."
    assert not _port_open(fhir), "the FHIR server outlived the demo"
    assert not _port_open(service)
    assert not (CACHE / f"run-{urlsplit(service).port}.json").exists()
