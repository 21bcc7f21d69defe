"""Latency percentiles, computed one way for every benchmark that reports them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Latency:
    """Milliseconds; ``n`` is how many answers they summarise (all None when none)."""

    n: int
    median_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    def cells(self) -> str:
        """The four figures as Markdown table cells ("-" where there were no answers)."""
        figures = (self.median_ms, self.p95_ms, self.p99_ms, self.max_ms)
        return " | ".join("-" if v is None else f"{v:.0f}" for v in figures)


def summarize(seconds: Sequence[float]) -> Latency:
    """Nearest-rank percentiles (the smallest value with at least p % of the values at or
    below it), so a p99 of 100 answers is a value some request really took."""
    if not seconds:
        return Latency(0, None, None, None, None)
    ms = sorted(s * 1000 for s in seconds)
    return Latency(len(ms), percentile(ms, 50), percentile(ms, 95), percentile(ms, 99), ms[-1])


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of values sorted in ascending order."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
