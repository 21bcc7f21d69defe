"""The project's own rules, checked on every test run so CI enforces them.

Import direction (service -> model -> fhir_adapter; no torch in the adapter), lint,
formatting and strict typing. Each runs the tool the README names, from this venv.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["lint-imports"],
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
        ["python", "scripts/api_reference.py", "--check"],
    ],
    ids=["import-contracts", "ruff-check", "ruff-format", "mypy", "api-reference-current"],
)
def test_tool_passes(command: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_every_setting_is_documented() -> None:
    guide = (ROOT / "docs" / "service.md").read_text()
    missing = [n for n in Settings.model_fields if f"`EHRMAMBA_{n.upper()}`" not in guide]
    assert missing == [], f"docs/service.md lacks {missing}"
