"""The demo's sample patients, and a FHIR server database holding them, each made once
and kept in ``.cache/demo``.

The patients are drawn by clinosim, an independent synthetic-patient generator (pinned in
pyproject, so every checkout draws the same ones), never written by hand: a demo on
resources shaped by this project would only show that the project agrees with itself.
Loading them into the server takes about as long as drawing them, so the loaded
database is kept as well, and every demo run starts its server on a fresh copy of it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson

from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.files import ExportReader
from fhir_adapter.local_server import FhirServer, start_fhir_server
from fhir_adapter.record import JsonObject, PatientRecord
from fhir_adapter.upload import upload_record

# One year of a 500-person catchment area: about 30 patients with a hospital stay, drawn
# in about a minute. Changing these draws the samples again.
SIMULATE = ["simulate", "--population", "500", "--seed", "7", "--country", "US",
            "--start", "2024-01-01", "--end", "2025-01-01", "--format", "fhir-r4"]  # fmt: skip
_SAMPLES = "samples.ndjson.gz"
_MANIFEST = "samples.json"
_FHIR_DATA = "fhir-data"

Say = Callable[[str], None]


@dataclass(frozen=True)
class Samples:
    """Every drawn patient with at least one inpatient stay, as one NDJSON file;
    ``example`` is one still in hospital where there is one."""

    path: Path
    patient_ids: list[str]
    example: str
    generator: str


def ensure_samples(cache: Path, say: Say) -> Samples:
    """The cached samples, drawn first if missing or drawn by another generator or draw."""
    generator = f"clinosim {version('clinosim')}"
    manifest = cache / _MANIFEST
    facts = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if facts.get("generator") != generator or facts.get("arguments") != SIMULATE:
        say(f"Drawing sample patients with {generator} (once; about a minute) ...")
        facts = _draw(cache, generator)
        say(f"  {len(facts['patients'])} patients with hospital stays in {facts['seconds']} s")
    return Samples(cache / _SAMPLES, facts["patients"], facts["example"], generator)


def _draw(cache: Path, generator: str) -> dict[str, Any]:
    cache.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache / _FHIR_DATA, ignore_errors=True)  # it holds the previous samples
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache, prefix="clinosim-") as tmp:
        out = Path(tmp)
        log = out / "clinosim.log"
        with log.open("wb") as sink:
            done = subprocess.run(
                [str(Path(sys.executable).with_name("clinosim")), *SIMULATE, "-o", str(out)],
                cwd=out,
                stdout=sink,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"clinosim failed ({done.returncode}):\n{tail}")
        records = [r for r in ExportReader(out / "fhir_r4").records() if _stays(r)]
        if not records:
            raise RuntimeError("clinosim drew no patient with a hospital stay")
        partial = cache / f"{_SAMPLES}.partial"
        with gzip.open(partial, "wb") as sink:
            for resource in _resources(records):
                sink.write(orjson.dumps(resource) + b"\n")
        partial.replace(cache / _SAMPLES)
    facts = {
        "generator": generator,
        "arguments": SIMULATE,
        "seconds": round(time.monotonic() - started, 1),
        "patients": [r.patient_id for r in records],
        "example": next((r.patient_id for r in records if _in_hospital(r)), records[0].patient_id),
    }
    (cache / _MANIFEST).write_text(json.dumps(facts, indent=1))
    return facts


def _stays(record: PatientRecord) -> list[JsonObject]:
    return [
        r
        for r in record.resources
        if r["resourceType"] == "Encounter" and (r.get("class") or {}).get("code") == "IMP"
    ]


def _in_hospital(record: PatientRecord) -> bool:
    """Still admitted when the draw ends: every task, length of stay too, can be asked."""
    return any(not (stay.get("period") or {}).get("end") for stay in _stays(record))


def _resources(records: list[PatientRecord]) -> Iterator[JsonObject]:
    medications = {key: m for r in records for key, m in r.medications.items()}
    yield from medications.values()
    for record in records:
        if record.patient is not None:
            yield record.patient
        yield from record.resources


def ensure_fhir_data(cache: Path, samples: Samples, sekmet: Path, say: Say) -> Path:
    """A FHIR server data folder holding the samples, loaded first if missing."""
    data = cache / _FHIR_DATA
    if data.is_dir():
        return data
    say(f"Loading the {len(samples.patient_ids)} patients into a FHIR server (once) ...")
    build = cache / "fhir-build"
    shutil.rmtree(build, ignore_errors=True)
    server = start_fhir_server(sekmet, build)
    try:
        asyncio.run(_upload(server.base_url, samples.path))
    finally:
        server.stop()
    (build / "data").rename(data)
    shutil.rmtree(build)
    return data


async def _upload(base_url: str, samples: Path) -> None:
    async with FhirClient(FhirClientConfig(base_url=base_url, timeout=120)) as client:
        for record in ExportReader(samples).records():
            await upload_record(client, record)


@contextmanager
def sample_server(data: Path, sekmet: Path) -> Iterator[FhirServer]:
    """A FHIR server on a copy of ``data``, stopped and removed on exit: demo runs never
    change the kept database, nor share one."""
    with tempfile.TemporaryDirectory(prefix="ehrmamba-demo-fhir-") as tmp:
        shutil.copytree(data, Path(tmp) / "data")
        server = start_fhir_server(sekmet, Path(tmp))
        try:
            yield server
        finally:
            server.stop()
