"""The training loop: it learns, resumes an interrupted run exactly, stops early, refuses to
mix settings, and never redoes a finished run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from training.loop import Data, LoopConfig, fit

Batch = tuple[torch.Tensor, torch.Tensor]


def _data(n: int, flip: bool = False, seed: int = 0) -> Data[Batch]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    y = -y if flip else y
    return Data([1] * n, lambda idx: (x[idx], y[idx]))


def _loss(module: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    error: torch.Tensor = (module(x).squeeze(-1) - y) ** 2
    return error.mean()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


CONFIG = LoopConfig(epochs=4, learning_rate=0.05, batch_tokens=8, patience=10)


def test_it_learns_and_keeps_the_best_weights(tmp_path: Path) -> None:
    model = _model()
    before = _loss(model, _data(64, seed=1).make(list(range(64))))
    result = fit(model, _data(64), _data(64, seed=1), _loss, CONFIG, tmp_path, show_progress=False)
    with torch.no_grad():
        after = _loss(model, _data(64, seed=1).make(list(range(64))))
    assert float(after) == pytest.approx(result.best_validation, rel=1e-5)
    assert float(after) < 0.5 * float(before)
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if "validation_loss" in e] == [1, 2, 3, 4]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    whole = _model()
    fit(whole, _data(64), _data(32, seed=1), _loss, CONFIG, tmp_path / "a", show_progress=False)

    calls = {"n": 0}

    def crashing(module: nn.Module, batch: Batch) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 20 and module.training:  # in epoch 3 (8 batches per epoch)
            raise KeyboardInterrupt
        return _loss(module, batch)

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _data(64), _data(32, seed=1), crashing, CONFIG, tmp_path / "b",
            show_progress=False)  # fmt: skip
    resumed = _model()
    fit(resumed, _data(64), _data(32, seed=1), _loss, CONFIG, tmp_path / "b", show_progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log if "validation_loss" in x] == [1, 2, 3, 4]


def test_early_stopping_when_validation_gets_worse(tmp_path: Path) -> None:
    config = LoopConfig(epochs=20, learning_rate=0.05, batch_tokens=8, patience=2)
    result = fit(_model(), _data(64), _data(32, flip=True), _loss, config, tmp_path,
                 show_progress=False)  # fmt: skip
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 2


def test_a_finished_run_is_not_redone_and_settings_are_not_mixed(tmp_path: Path) -> None:
    first = fit(_model(), _data(64), _data(32, seed=1), _loss, CONFIG, tmp_path / "r",
                show_progress=False)  # fmt: skip

    def forbidden(module: nn.Module, batch: Batch) -> torch.Tensor:
        raise AssertionError("a finished run must not train again")

    again = _model()
    assert fit(again, _data(64), _data(32, seed=1), forbidden, CONFIG, tmp_path / "r",
               show_progress=False) == first  # fmt: skip
    (tmp_path / "r" / "result.json").unlink()
    other = LoopConfig(epochs=5, learning_rate=0.05, batch_tokens=8, patience=10)
    with pytest.raises(ValueError, match="other settings"):
        fit(_model(), _data(64), _data(32, seed=1), _loss, other, tmp_path / "r",
            show_progress=False)  # fmt: skip


def test_data_parallel_under_torchrun(tmp_path: Path) -> None:
    """Two processes (gloo on CPU) split the batches and end with the same weights."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "tests/support/ddp_fit.py", str(tmp_path)]  # fmt: skip
    root = Path(__file__).parents[2]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for a, b in zip(ranks[0]["state"].values(), ranks[1]["state"].values(), strict=True):
        assert torch.equal(a, b)
    epochs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    validation = [e["validation_loss"] for e in epochs if "validation_loss" in e]
    assert len(validation) == 3
    assert validation[-1] < validation[0]
