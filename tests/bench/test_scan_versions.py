"""``ehrmamba bench scan-versions``: the other revision's scan is really the one timed, both
versions are measured in both cases, and they agree."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from bench import scan_versions
from model import fastmath, scan

REPO = Path(__file__).resolve().parents[2]


def test_both_versions_are_timed_on_both_cases_and_agree() -> None:
    comparisons = scan_versions.run("HEAD", REPO, tokens=64, batch=2, length=32, rounds=2)
    assert [c.case for c in comparisons] == ["forward", "train_step"]
    for c in comparisons:
        assert set(c.median_s) == {"current", "HEAD"}
        assert all(s > 0 for s in c.median_s.values())
        assert c.runs == 1
        assert c.max_difference < 1e-4  # any correct scan agrees with any other
    assert "| forward | 1 x 64 |" in scan_versions.table(comparisons)


def test_the_loaded_revision_is_what_the_model_calls_while_in_use() -> None:
    other = scan_versions.load_revision("HEAD", REPO)
    mine = scan.fast_scan, scan.compiled_scan
    assert other.fast_scan is not mine[0]
    assert other.fastmath is not fastmath, "with the revision's own kernel helpers"
    assert Path(str(other.fastmath.__file__)).parent == Path(str(other.__file__)).parent
    with scan_versions.using(other):
        assert scan.fast_scan is other.fast_scan
        assert scan.compiled_scan is other.compiled_scan
    assert (scan.fast_scan, scan.compiled_scan) == mine, "restored afterwards"


def test_an_unknown_revision_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"cannot read model/scan\.py at 'no-such-rev'"):
        scan_versions.load_revision("no-such-rev", REPO)


def test_a_scan_before_the_fused_kernel_is_a_clear_error() -> None:
    """As model/scan.py was until f677de8: delta after its softplus, no gate."""

    def fast_scan(*inputs: object, capture: object = None, parent: object = None) -> None:
        """The old keywords: no delta_bias, no gate."""

    old = ModuleType("old_scan")
    old.fast_scan = fast_scan  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="predates the fused forward kernel"):
        scan_versions.check_compatible(old, "f677de8")
    scan_versions.check_compatible(scan, "current")  # the current one passes
