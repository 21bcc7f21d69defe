"""Signed view links open one patient on one server until they expire, and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import uvicorn
from pydantic import SecretStr

from cli.serve import serve
from service.settings import Settings
from service.view_token import Rejection, ViewTokenRejected, ViewTokens

BASE = "https://fhir.hospital.example/r4"
NOW = 1_800_000_000.0


def _rejected(tokens: ViewTokens, token: str, patient: str, base: str, now: float) -> Rejection:
    with pytest.raises(ViewTokenRejected) as caught:
        tokens.check(token, patient, base, now)
    return caught.value.reason


def test_a_token_opens_its_patient_until_it_expires() -> None:
    tokens = ViewTokens(b"k" * 32, 900)
    token = tokens.issue("p-1", BASE, NOW)
    tokens.check(token, "p-1", BASE, NOW)
    tokens.check(token, "p-1", BASE + "/", NOW + 899)  # a trailing slash is the same server
    assert _rejected(tokens, token, "p-1", BASE, NOW + 900) is Rejection.EXPIRED


def test_another_patient_server_key_or_expiry_is_refused() -> None:
    tokens = ViewTokens(b"k" * 32, 900)
    token = tokens.issue("p-1", BASE, NOW)
    assert _rejected(tokens, token, "p-2", BASE, NOW) is Rejection.SIGNATURE
    assert _rejected(tokens, token, "p-1", "https://other.example/r4", NOW) is Rejection.SIGNATURE
    other_key = ViewTokens(b"x" * 32, 900)
    assert _rejected(other_key, token, "p-1", BASE, NOW) is Rejection.SIGNATURE
    expiry, _, signature = token.partition(".")
    longer = f"{int(expiry) + 3600}.{signature}"  # a forger stretching the link's life
    assert _rejected(tokens, longer, "p-1", BASE, NOW) is Rejection.SIGNATURE


@pytest.mark.parametrize(
    "token", ["", "abc", ".sig", "12x.sig", "\u0661\u0662.sig", "12.", "1.2.3"]
)
def test_malformed_tokens_are_refused(token: str) -> None:
    tokens = ViewTokens(b"k" * 32, 900)
    assert _rejected(tokens, token, "p-1", BASE, NOW) in {Rejection.MALFORMED, Rejection.SIGNATURE}


def test_the_key_comes_from_settings_or_is_one_per_process() -> None:
    shared = Settings(view_token_secret=SecretStr("s3cret"), view_token_lifetime=60)
    a, b = ViewTokens.from_settings(shared), ViewTokens.from_settings(shared.model_copy())
    assert a == b
    assert a.lifetime == 60
    b.check(a.issue("p-1", BASE), "p-1", BASE)
    drawn = ViewTokens.from_settings(Settings())
    assert drawn == ViewTokens.from_settings(Settings()), "one random key for the process"
    assert drawn.key != a.key
    assert len(drawn.key) == 32


def test_serve_hands_all_its_workers_one_drawn_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("EHRMAMBA_VIEW_TOKEN_SECRET", "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.delenv(name, raising=False)  # and restored after the test
    keys: list[str | None] = []
    monkeypatch.setattr(
        uvicorn, "run", lambda *_, **__: keys.append(os.environ.get("EHRMAMBA_VIEW_TOKEN_SECRET"))
    )
    serve(workers=1)
    serve(workers=2, metrics_dir=tmp_path / "metrics")
    monkeypatch.setenv("EHRMAMBA_VIEW_TOKEN_SECRET", "configured")
    serve(workers=2, metrics_dir=tmp_path / "metrics")
    assert keys[0] is None  # one process: its own random key is enough
    assert keys[1] is not None
    assert len(keys[1]) == 64
    assert keys[2] == "configured"
