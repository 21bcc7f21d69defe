"""The recurrent step as an ONNX graph, run by onnxruntime.

Shape letters: b batch, L blocks, d intermediate size, K conv width, n state size,
h hidden size, v vocabulary size, t tasks.

One step takes a token (its six attribute streams, each (b,)) and every block's state
(conv (L, b, d, K-1), ssm (L, b, d, n)) and returns the hidden vector (b, h), next-token
logits (b, v), the clinical head's logits (b, t: read the column of the task whose token
was stepped) and the new states. Exported from a batch of
2 (an exporter can silently fix a dimension it only ever saw as 1) with the batch dimension
dynamic, and checked against PyTorch right after export: an export that changes numbers
without an error has happened before (issue "EHRMamba model", traps).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from model.network import STREAMS, EHRMamba, TokenBatch
from model.state import ModelState

INPUTS = (*STREAMS, "conv", "ssm")
OUTPUTS = ("hidden", "logits", "task_logits", "conv_out", "ssm_out")


class StepGraph(nn.Module):
    """``EHRMamba`` reduced to one step with stacked states, for export."""

    def __init__(self, model: EHRMamba) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        concept: torch.Tensor,
        type: torch.Tensor,
        age: torch.Tensor,
        time: torch.Tensor,
        segment: torch.Tensor,
        visit_order: torch.Tensor,
        conv: torch.Tensor,
        ssm: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        batch = TokenBatch(*(t.unsqueeze(1) for t in (concept, type, age, time, segment,
                                                      visit_order)))  # fmt: skip
        hidden, end, _ = self.model(batch, ModelState(conv, ssm))
        last = hidden[:, 0]
        return (
            last,
            self.model.next_token_logits(last),
            self.model.task_logits(last),
            end.conv,
            end.ssm,
        )


def example_inputs(model: EHRMamba, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random step inputs. Every stream is its own tensor: an exporter given one tensor for
    several inputs may tie them together in the graph (seen here: wrong numbers, no error)."""
    config = model.config
    layers, d = config.num_hidden_layers, config.intermediate_size
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, config.vocab_size, (batch,), generator=g),
        torch.randint(0, config.n_token_types, (batch,), generator=g),
        torch.rand(batch, generator=g) * 90,
        2800 + torch.rand(batch, generator=g) * 100,
        torch.randint(0, config.n_segments, (batch,), generator=g),
        torch.randint(0, 50, (batch,), generator=g),
        torch.randn(layers, batch, d, config.conv_kernel - 1, generator=g),
        torch.randn(layers, batch, d, config.state_size, generator=g),
    )


def export_step(model: EHRMamba, path: Path, *, tolerance: float = 1e-4) -> Path:
    """Export, then run both on fresh inputs (another batch size, other values) and raise if
    they disagree beyond ``tolerance``."""
    graph = StepGraph(model.eval()).eval()
    example = example_inputs(model)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: batch_dim} for name in INPUTS[:6]}
    dynamic.update({"conv": {1: batch_dim}, "ssm": {1: batch_dim}})
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress
        torch.onnx.export(
            graph, example, str(path), input_names=list(INPUTS), output_names=list(OUTPUTS),
            dynamic_shapes=dynamic, dynamo=True, external_data=False,
        )  # fmt: skip
        _strip_debug_info(path)
        check = example_inputs(model, batch=3, seed=1)
        expected = [t.numpy() for t in graph(*check)]
    got = OnnxStep(path).run(*(t.numpy() for t in check))
    for name, want, have in zip(OUTPUTS, expected, got, strict=True):
        error = float(np.abs(want - have).max())
        if error > tolerance:
            raise RuntimeError(f"ONNX step differs from PyTorch on {name}: {error:.2e}")
    return path


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node metadata: stack traces that name this machine's file
    paths, FX node dumps. The graph and its numbers are untouched, and the artifact no longer
    depends on where it was built."""
    proto = onnx.load(str(path))
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
    onnx.save(proto, str(path))


class OnnxStep:
    """An onnxruntime session for an exported step."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        # Idle onnxruntime workers spin by default and starve PyTorch's threads between steps.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, *inputs: npt.NDArray[np.generic]) -> list[npt.NDArray[np.float32]]:
        """Inputs in ``INPUTS`` order (ints as int64, floats as float32); outputs in
        ``OUTPUTS`` order."""
        feed = {
            name: np.asarray(value, dtype=np.float32 if name in ("age", "time", "conv", "ssm")
                             else np.int64)
            for name, value in zip(INPUTS, inputs, strict=True)
        }  # fmt: skip
        outputs: list[npt.NDArray[np.float32]] = self.session.run(list(OUTPUTS), feed)
        return outputs
