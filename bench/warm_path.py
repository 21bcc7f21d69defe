"""The three parts of a warm predict that issue #6's last changes made cheaper, each old way
beside the new one in one run (`ehrmamba bench warm-path`).

- ``fhir_check``: the incremental fetch of a patient with nothing new, against a real
  sekmet FHIR server loaded with ``patients`` shared patients: the ``_lastUpdated``
  searches in one batch (``filter``: what the client does for a server that does not show
  its sort) against the change probes (``probes``, the default; ``fhir_adapter.changes``).
- ``record``: the cached record to a timeline: decode the JSON and normalise it
  (``decode``: the memo off) against the process's record memo (``memo``).
- ``engine_hit``: the engine call of a warm hit with a 3-event forecast (no token to scan;
  the task tokens branch off the cached state, two one-token forecast steps) with the steps
  in PyTorch (``pytorch``) and in onnxruntime (``onnxruntime``).

Every case runs over the same patients, ``rounds`` times, the two ways interleaved per
patient so that a change in the machine's load falls on both.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from bench.procfs import CpuShare
from bench.stack import DEFAULT_DATA, load_records, upload
from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.local_server import install_fhir_server, start_fhir_server
from fhir_adapter.normalize import build_timeline
from model.artifact import load_artifact
from model.onnx_step import OnnxStep
from service.cache import MemoryCache
from service.patient_cache import CachedRecord, PatientCache
from service.scoring import Scorer

FORECAST = 3  # events in the warm hit's forecast: the steps the two ways differ in


@dataclass(frozen=True)
class Measurement:
    case: str
    impl: str
    n: int
    median_ms: float
    p95_ms: float


def run(data: Path = DEFAULT_DATA, patients: int = 60, rounds: int = 3,
        model: Path = Path("models/compact")) -> tuple[list[Measurement], float]:  # fmt: skip
    """Every case both ways; also the share of the CPU other processes took meanwhile."""
    share = CpuShare()
    measurements = asyncio.run(_measure(data, patients, rounds, model))
    return measurements, share.shares()[1]


async def _measure(data: Path, patients: int, rounds: int, model: Path) -> list[Measurement]:
    records = load_records(data, patients)
    times: dict[tuple[str, str], list[float]] = {}

    async def timed(case: str, impl: str, work: Callable[[], Awaitable[object]]) -> None:
        started = time.perf_counter()
        await work()
        times.setdefault((case, impl), []).append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory(prefix="ehrmamba-warm-") as tmp:
        fhir = start_fhir_server(install_fhir_server(), Path(tmp) / "fhir")
        try:
            await upload(fhir.base_url, records)
            since = datetime.now(UTC)
            config = FhirClientConfig(base_url=fhir.base_url)
            async with FhirClient(config) as probes, FhirClient(config) as filtered:
                filtered.sort_supported = False
                for _ in range(rounds):
                    for record in records:
                        for impl, client in (("filter", filtered), ("probes", probes)):
                            fetch = partial(client.fetch_patient, record.patient_id, since=since)
                            await timed("fhir_check", impl, fetch)
        finally:
            fhir.stop()

    memory = MemoryCache()
    ways = {"decode": PatientCache(memory, b"bench", 60.0, memo_size=0),
            "memo": PatientCache(memory, b"bench", 60.0, memo_size=len(records))}  # fmt: skip
    for record in records:  # as the service leaves it: written with its timeline
        await ways["memo"].save_record(CachedRecord(record, None), build_timeline(record))

    async def to_timeline(cache: PatientCache, source: str, pid: str) -> object:
        entry = await cache.load_record(source, pid, checked=False)  # as at freshness 0
        assert entry is not None
        return cache.memo.timeline(entry)

    for _ in range(rounds):
        for record in records:
            for impl, cache in ways.items():
                load = partial(to_timeline, cache, record.source, record.patient_id)
                await timed("record", impl, load)

    artifact = load_artifact(model)
    if artifact.onnx_step is None:
        raise ValueError(f"{model} has no step.onnx to compare with")
    step = OnnxStep(artifact.onnx_step, 1)
    scorers = {"pytorch": Scorer(artifact), "onnxruntime": Scorer(artifact, step)}
    now = datetime.now(UTC)
    hits = []
    reference = scorers["pytorch"]
    for record in records:
        timeline = build_timeline(record)
        if timeline.patient.birth_date is None:
            continue
        sequence = reference.tokenize(timeline, now)
        first = reference.run([reference.prepare(timeline, sequence, reference.tasks, 0, now)])[0]
        hits.append(
            reference.prepare(timeline, sequence, reference.tasks, FORECAST, now, first.cache)
        )
    for _ in range(rounds):
        for prepared in hits:
            for impl, scorer in scorers.items():
                await timed("engine_hit", impl, partial(asyncio.to_thread, scorer.run, [prepared]))
    return [_summary(case, impl, seconds) for (case, impl), seconds in times.items()]


def _summary(case: str, impl: str, seconds: list[float]) -> Measurement:
    ordered = sorted(s * 1000 for s in seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return Measurement(case, impl, len(ordered), statistics.median(ordered), p95)


def table(measurements: list[Measurement], others: float) -> str:
    lines = ["| case | way | n | median ms | p95 ms |", "|---|---|---:|---:|---:|"]
    lines += [f"| {m.case} | {m.impl} | {m.n} | {m.median_ms:.1f} | {m.p95_ms:.1f} |"
              for m in measurements]  # fmt: skip
    lines.append(f"\nother processes took {others:.0%} of the CPU meanwhile")
    return "\n".join(lines)
