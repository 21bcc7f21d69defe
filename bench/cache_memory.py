"""What one cached patient costs the cache (`ehrmamba bench cache-memory`).

The service keeps two entries per patient (``service/patient_cache.py``): the raw record
with its watermark, and the scan state with its token digest (and a few bytes more, when
the record was last confirmed, where ``fhir_freshness`` is above 0). Their byte sizes are what
Redis or the in-process LRU hold, so this measures exactly those bytes, made by the
service's own encoders from shared patients scored by the committed model. The state entry
is the constant-cost part (its size does not depend on the record's length); the record
entry grows with the record.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.stack import DEFAULT_DATA, load_records
from fhir_adapter.normalize import build_timeline
from model.artifact import load_artifact
from service.patient_cache import CachedRecord, PatientCache, StoredScan, sequence_digest
from service.scoring import Scorer


class SizeRecorder:
    """A cache that keeps only how many bytes each entry would hold, by entry kind."""

    def __init__(self) -> None:
        self.sizes: dict[str, list[int]] = {}

    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        kind = key.split(":")[1]  # ehrmamba:<kind>:<hmac>
        self.sizes.setdefault(kind, []).append(len(value))

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        await self.set(key, value, ttl)
        return True


@dataclass(frozen=True)
class EntrySizes:
    kind: str
    n: int
    median_kib: float
    p95_kib: float
    max_kib: float
    note: str


def run(
    data: Path = DEFAULT_DATA, patients: int = 60, model: Path = Path("models/compact")
) -> list[EntrySizes]:
    """Encode both entries for ``patients`` shared patients and report their sizes."""
    return asyncio.run(_measure(data, patients, model))


async def _measure(data: Path, patients: int, model: Path) -> list[EntrySizes]:
    scorer = Scorer(load_artifact(model))
    recorder = SizeRecorder()
    cache = PatientCache(recorder, b"bench", ttl=60.0)
    tokens: list[int] = []
    for record in load_records(data, patients):
        timeline = build_timeline(record)
        if timeline.patient.birth_date is None:
            continue
        now = datetime.now(UTC)
        sequence = scorer.tokenize(timeline, now)
        if len(sequence) <= 1:
            continue
        scored = scorer.run([scorer.prepare(timeline, sequence, scorer.tasks, 0, now)])[0]
        await cache.save_record(CachedRecord(record, timeline.source.last_updated))
        stored = StoredScan(scored.cache, sequence_digest(sequence, scored.cache.length))
        await cache.save_scan(record.source, record.patient_id, "bench", stored)
        tokens.append(len(sequence))
    note = f"tokens median {statistics.median(tokens):.0f}, max {max(tokens)}"
    return [
        _sizes("record", recorder.sizes["record"], note),
        _sizes("scan state", recorder.sizes["scan"], note),
    ]


def _sizes(kind: str, sizes: list[int], note: str) -> EntrySizes:
    values = [size / 1024 for size in sizes]
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return EntrySizes(kind, len(values), statistics.median(values), p95, ordered[-1], note)


def table(rows: list[EntrySizes]) -> str:
    lines = [
        "| entry | n | median KiB | p95 KiB | max KiB | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sizes = f"{r.median_kib:.1f} | {r.p95_kib:.1f} | {r.max_kib:.1f}"
        lines.append(f"| {r.kind} | {r.n} | {sizes} | {r.note} |")
    return "\n".join(lines)
