"""The ONNX step equals the PyTorch step, for batch sizes it was and was not exported with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.network import STREAMS, EHRMamba, TokenBatch
from model.onnx_step import OUTPUTS, OnnxStep, StepGraph, example_inputs, export_step
from model.state import ModelState


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[EHRMamba, OnnxStep]:
    torch.manual_seed(0)
    model = EHRMamba(ModelConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2)).eval()
    path = export_step(model, tmp_path_factory.mktemp("onnx") / "step.onnx")
    return model, OnnxStep(path)


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_onnx_step_equals_pytorch(exported: tuple[EHRMamba, OnnxStep], batch: int) -> None:
    model, step = exported
    inputs = example_inputs(model, batch, seed=10 + batch)
    with torch.no_grad():
        expected = StepGraph(model)(*inputs)
    got = step.run(*(t.numpy() for t in inputs))
    for name, want, have in zip(OUTPUTS, expected, got, strict=True):
        assert have.shape == tuple(want.shape), name
        assert np.abs(want.numpy() - have).max() < 1e-4, name


def test_step_graph_is_the_model_recurrence(exported: tuple[EHRMamba, OnnxStep]) -> None:
    """Stepping a sequence through ONNX gives the model's parallel hidden states."""
    model, step = exported
    g = torch.Generator().manual_seed(2)
    length = 9
    batch = TokenBatch(
        concept=torch.randint(0, 40, (1, length), generator=g),
        type=torch.randint(0, 10, (1, length), generator=g),
        age=torch.full((1, length), 61.0),
        time=2900 + torch.arange(length, dtype=torch.float32).unsqueeze(0),
        segment=torch.ones(1, length, dtype=torch.int64),
        visit_order=torch.ones(1, length, dtype=torch.int64),
    )
    with torch.no_grad():
        parallel, _, _ = model(batch)
    empty = ModelState.empty(model.config, 1)
    conv, ssm = empty.conv.numpy(), empty.ssm.numpy()
    for t in range(length):
        columns = [getattr(batch, f)[:, t].numpy() for f in
                   STREAMS]  # fmt: skip
        hidden, _, _, conv, ssm = step.run(*columns, conv, ssm)
        assert np.abs(hidden[0] - parallel[0, t].numpy()).max() < 1e-4


def test_the_exported_file_names_no_path_of_the_build_machine(tmp_path: Path) -> None:
    """The exporter writes stack traces with absolute source paths into node metadata; an
    artifact must not depend on, or reveal, where it was built."""
    torch.manual_seed(0)
    model = EHRMamba(ModelConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2)).eval()
    path = export_step(model, tmp_path / "step.onnx")
    root = str(Path(__file__).resolve().parents[2]).encode()
    assert root not in path.read_bytes()
    assert b"stack_trace" not in path.read_bytes()
