"""Nearest-rank percentiles: each one is a latency some request really had."""

from __future__ import annotations

from bench.latency import percentile, summarize


def test_percentiles_are_values_that_occurred() -> None:
    seconds = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    summary = summarize(seconds)
    assert (summary.n, summary.median_ms, summary.p95_ms, summary.p99_ms, summary.max_ms) == (
        100, 50.0, 95.0, 99.0, 100.0,
    )  # fmt: skip
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0


def test_no_answers_summarise_to_dashes() -> None:
    summary = summarize([])
    assert summary.n == 0
    assert summary.cells() == "- | - | - | -"
