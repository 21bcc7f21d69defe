"""`ehrmamba bench soak` for a few seconds against the real served stack (FHIR server,
``ehrmamba serve``, Redis): it sends what it says, loses nothing, and reports it."""

from __future__ import annotations

from pathlib import Path

from bench import soak
from tests.support.samples import require_shared_data, synthea_records

RATE = 2.0
MINUTES = 0.1  # 6 s: 12 requests
BURST = 24


def test_a_short_soak_and_burst_lose_nothing_and_report_what_happened(tmp_path: Path) -> None:
    require_shared_data()
    records = synthea_records(tmp_path, 4)  # quick to read: the clinosim export is not
    done = soak.run(records, minutes=MINUTES, rate=RATE, workers=1, timeout_s=120, burst=BURST)

    overall = done.windows[-1]
    assert [w.label for w in done.windows] == ["minute 1", "overall"]
    assert overall.sent == done.windows[0].sent == 12
    # Everything sent was answered by the service, and every 2xx was recorded.
    assert done.answered == overall.sent
    assert done.recorded == overall.statuses.get("200", 0)
    assert overall.ok.n == overall.statuses.get("200", 0)
    assert set(overall.statuses) <= {"200", "429"}
    assert [s.label for s in done.samples] == ["before", "after"]
    for sample in done.samples:
        assert sample.footprint.processes == 1  # one uvicorn process, no workers
        assert sample.footprint.rss_bytes > 100 * 1024 * 1024  # torch and the model
        assert sample.footprint.open_fds > 0

    probe = done.probe
    assert probe is not None
    assert probe.sent == BURST
    assert sum(probe.statuses.values()) == BURST
    assert probe.answered == BURST
    assert probe.recorded == probe.statuses.get("200", 0)
    assert probe.retry_after == probe.statuses.get("429", 0)

    text = soak.report(done)
    assert "| minute 1 | 12 |" in text
    assert f"| {BURST} | {probe.statuses.get('429', 0)} |" in text
