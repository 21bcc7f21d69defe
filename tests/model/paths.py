"""The model's CPU inference paths, for tests that should hold on each."""

from __future__ import annotations

import pytest

from model import packed

INFERENCE_PATHS = ("packed", "blocks")
SCAN_PATHS = (*INFERENCE_PATHS, "reference-scan")  # the last: with gradients


def use_inference_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Send no-gradient forwards through the whole backbone in one compiled call
    (``model.packed``, whatever their size: "packed"), or block by block, the fused scan
    and conv that sequences longer than ``packed.FEW_TOKENS`` take ("blocks")."""
    if path not in INFERENCE_PATHS:
        raise ValueError(f"unknown inference path {path!r}")
    monkeypatch.setattr(packed, "FEW_TOKENS", 10**9 if path == "packed" else 0)


def use_scan_path(monkeypatch: pytest.MonkeyPatch, path: str) -> bool:
    """Set up one of ``SCAN_PATHS``; whether the test should run with gradients on (the
    "reference-scan" path: every forward then takes the training path)."""
    if path == "reference-scan":
        return True
    use_inference_path(monkeypatch, path)
    return False
