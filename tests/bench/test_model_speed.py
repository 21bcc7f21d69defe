"""The model benchmark's timing harness: implementations of a case take turns, so both
sides of a ratio see the same stretch of a machine whose speed drifts."""

from __future__ import annotations

from bench.model_speed import Entry, measure_together


def test_implementations_are_timed_in_turns_with_their_own_runs_and_bursts() -> None:
    calls: list[str] = []
    entries = [
        Entry("a", 10, 2, lambda: calls.append("a"), burst=2, note="2 in a row"),
        Entry("b", 2058, 3, lambda: calls.append("b")),
    ]
    measured = measure_together("case", "compact", entries)
    warm_up, turns = calls[:2], calls[2:]
    assert warm_up == ["a", "b"]  # untimed, under the memory sampler
    assert turns == ["a", "a", "b", "a", "a", "b", "b"]  # a sits out the last turn
    assert [(m.impl, m.tokens, m.runs, m.note) for m in measured] == [
        ("a", 10, 4, "2 in a row"),
        ("b", 2058, 3, ""),
    ]
    assert all(m.median_s >= 0 and m.peak_mb >= 0 for m in measured)
