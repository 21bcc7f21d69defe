"""Per-source counts: what a FHIR source holds once it is read the way the model reads it.

This is the data behind ``ehrmamba data inspect`` and docs/data.md. It goes through the
same reader and normaliser as training and serving, so the counts it prints are the
counts the model sees, drops included.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline


@dataclass(slots=True)
class SourceSummary:
    """Counts for one source. ``dropped`` is keyed ``Type:reason``."""

    source: str
    patients: int = 0
    visits: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    conditions: int = 0
    resources: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    skipped_types: Counter[str] = field(default_factory=Counter)
    files: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; counters become plain objects with sorted keys."""
        return {
            "source": self.source,
            "patients": self.patients,
            "visits": _plain(self.visits),
            "events": _plain(self.events),
            "conditions": self.conditions,
            "dropped": _plain(self.dropped),
            "resources": _plain(self.resources),
            "skipped_types": _plain(self.skipped_types),
            "files": self.files,
            "seconds": round(self.seconds, 2),
        }


def summarize(path: Path, on_patient: Callable[[int], None] | None = None) -> SourceSummary:
    """Read ``path`` fully and count; ``on_patient`` is called with the running total."""
    started = time.perf_counter()
    reader = ExportReader(path)
    summary = SourceSummary(source=str(path))
    for record in reader.records():
        timeline = build_timeline(record)
        summary.patients += 1
        summary.visits.update(v.visit_class.value for v in timeline.visits)
        summary.events.update(e.kind.value for e in timeline.events)
        summary.conditions += len(timeline.conditions)
        summary.resources.update(timeline.source.resource_counts)
        summary.dropped.update(timeline.source.dropped)
        if on_patient is not None:
            on_patient(summary.patients)
    summary.dropped.update(reader.stats.dropped)
    summary.skipped_types.update(reader.stats.skipped_types)
    summary.files = reader.stats.files
    summary.seconds = time.perf_counter() - started
    return summary


def _plain(counter: Counter[str]) -> dict[str, int]:
    return {key: counter[key] for key in sorted(counter)}
