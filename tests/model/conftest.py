"""Both CPU inference paths for the model tests that should hold on each."""

from __future__ import annotations

import pytest

from tests.model.paths import INFERENCE_PATHS, use_inference_path


@pytest.fixture(params=INFERENCE_PATHS)
def inference_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's no-gradient forwards run on each path (``tests.model.paths``)."""
    use_inference_path(monkeypatch, str(request.param))
    return str(request.param)
