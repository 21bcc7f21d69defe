"""A dataset built once from real Synthea patients, shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.support.samples import extract_synthea, require_shared_data

PATIENTS = 40


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_shared_data()
    return extract_synthea(tmp_path_factory.mktemp("synthea"), PATIENTS)


@pytest.fixture(scope="session")
def built(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset")
    result = CliRunner().invoke(
        app, ["data", "build", str(source), "--out", str(out), "--min-count", "2"]
    )
    assert result.exit_code == 0, result.output
    return out
