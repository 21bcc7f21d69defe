"""``ehrmamba bench warm-path`` on two shared patients: every case measured both ways, over
every patient, against the real FHIR server and the committed model."""

from __future__ import annotations

from bench import warm_path
from tests.support.samples import SHARED_DATA, require_shared_data


def test_every_case_is_measured_both_ways() -> None:
    require_shared_data()
    measurements, others = warm_path.run(SHARED_DATA, patients=2, rounds=2)
    ways = {(m.case, m.impl): m for m in measurements}
    assert set(ways) == {
        ("fhir_check", "filter"), ("fhir_check", "probes"),
        ("record", "decode"), ("record", "memo"),
        ("engine_hit", "pytorch"), ("engine_hit", "onnxruntime"),
    }  # fmt: skip
    assert ways["fhir_check", "probes"].n == ways["record", "memo"].n == 4
    assert ways["engine_hit", "pytorch"].n == ways["engine_hit", "onnxruntime"].n > 0
    assert all(0 < m.median_ms <= m.p95_ms for m in measurements)
    assert 0.0 <= others <= 1.0
    assert "| fhir_check | probes | 4 |" in warm_path.table(measurements, others)
