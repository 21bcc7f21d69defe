"""The network in one compiled call (``model.packed``): equal to the embeddings and blocks
run as tensor operations, with PyTorch's sgemm or numpy's, taken only where it should be,
never stale after a weight changes, and refusing ids its tables lack."""

from __future__ import annotations

import dataclasses
import platform

import numpy as np
import pytest
import torch
from torch import nn

from model import blas, packed
from model.config import ModelConfig
from model.network import EHRMamba, TokenBatch
from model.state import ModelState
from tests.model.paths import use_inference_path
from tests.model.random_batches import VOCAB, random_batch

TOL = 2e-5
PARENTS = [-1, 0, 1, 2, 3, 4, 5, 5, 2, 8, -1, 10]  # branches, a deeper branch, a restart


def _model(bias: bool = False) -> EHRMamba:
    torch.manual_seed(2)
    config = ModelConfig(  # visit orders beyond 8 share its row: random batches reach 29
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        use_bias=bias,
        dropout=0.0,
        max_visit_order=8,
    )
    return EHRMamba(config).eval()


def _close(a: ModelState, b: ModelState) -> None:
    for got, want in zip(a.layers, b.layers, strict=True):
        assert (got.ssm - want.ssm).abs().max().item() < TOL
        assert (got.conv - want.conv).abs().max().item() < TOL


def _forward(
    model: EHRMamba, path: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, ModelState, ModelState | None]:
    """Trees in row 0, a right-padded chain in row 1, from a carried state, with captures
    (-1 included), on one inference path."""
    with monkeypatch.context() as patch, torch.inference_mode():
        use_inference_path(patch, path)
        start = model(random_batch(2, 5, seed=4))[1]
        parent = torch.tensor([PARENTS, list(range(-1, len(PARENTS) - 1))])
        capture = torch.tensor([[6, 9, 11], [3, -1, 7]])
        hidden, end, captured = model(random_batch(2, len(PARENTS), seed=5), start, capture, parent)
        return hidden, end, captured


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("sgemm", [True, False], ids=["torch-sgemm", "np-dot"])
@pytest.mark.parametrize("copies", [True, False], ids=["transposed-copies", "in-place"])
def test_packed_equals_the_blocks(
    bias: bool, sgemm: bool, copies: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not copies:
        monkeypatch.setattr(packed, "COPY_BUDGET", 0)
    model = _model(bias)
    with torch.inference_mode():
        weights = model._packed()
        assert weights is not None
        model._packed_weights = dataclasses.replace(weights, use_sgemm=sgemm)
    hidden, end, captured = _forward(model, "packed", monkeypatch)
    want_hidden, want_end, want_captured = _forward(model, "blocks", monkeypatch)
    assert (hidden - want_hidden).abs().max().item() < TOL
    _close(end, want_end)
    assert captured is not None
    assert want_captured is not None
    _close(captured, want_captured)
    assert torch.count_nonzero(captured.layers[0].ssm[1, 1]) == 0, "-1 captures nothing"


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="PyTorch's x86 Linux wheels are the ones known to export MKL's sgemm",
)
def test_pytorch_sgemm_is_found_where_its_wheels_export_it() -> None:
    assert all(blas.routines())


def test_projections_are_copied_only_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transposed copies are faster; beyond ``COPY_BUDGET`` (a paper-size model's would be
    0.5 GB more) the kernel reads the parameters themselves. Tables are never copied."""
    model = _model()
    mixer = model.backbone.blocks()[2].mixer
    in_proj = mixer.in_proj.weight.detach().numpy()
    with torch.no_grad():
        copied = packed.PackedModel.of(model)
        monkeypatch.setattr(packed, "COPY_BUDGET", 0)
        shared = packed.PackedModel.of(model)
    assert copied.transposed
    assert not np.shares_memory(copied.in_proj[2], in_proj)
    assert not shared.transposed
    assert np.shares_memory(shared.in_proj[2], in_proj)
    assert np.shares_memory(shared.out_proj[2], mixer.out_proj.weight.detach().numpy())
    for weights in (copied, shared):
        assert np.shares_memory(weights.concepts, model.backbone.embeddings.weight.detach().numpy())


def test_a_weight_changed_after_packing_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    before, _, _ = _forward(model, "packed", monkeypatch)
    mixer = model.backbone.blocks()[1].mixer
    with torch.no_grad():
        mixer.in_proj.weight.mul_(1.5)  # in place: an optimizer step, a loaded state dict
        model.embed.time.periodic.weight.mul_(1.5)
    changed, _, _ = _forward(model, "packed", monkeypatch)
    want, _, _ = _forward(model, "blocks", monkeypatch)
    assert (changed - before).abs().max().item() > 1e-3
    assert (changed - want).abs().max().item() < TOL
    mixer.out_proj.weight = nn.Parameter(torch.randn_like(mixer.out_proj.weight))  # replaced
    replaced, _, _ = _forward(model, "packed", monkeypatch)
    want, _, _ = _forward(model, "blocks", monkeypatch)
    assert (replaced - changed).abs().max().item() > 1e-3
    assert (replaced - want).abs().max().item() < TOL


def test_only_few_tokens_without_gradients_take_the_packed_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    calls: list[int] = []
    forward = packed.PackedModel.forward

    def spy(self: packed.PackedModel, batch: TokenBatch, *args: object) -> object:
        calls.append(batch.concept.numel())
        return forward(self, batch, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(packed.PackedModel, "forward", spy)
    with torch.no_grad():
        model(random_batch(2, packed.FEW_TOKENS // 2))
        model(random_batch(2, packed.FEW_TOKENS // 2 + 1))
        model.train()  # dropout: the tensor operations draw it
        model(random_batch(1, 8))
        model.eval()
        assert packed.packable(model)
        model.double()  # float64 weights: the kernel computes in float32, so not for these
        assert not packed.packable(model)
        model.float()  # a cast replaces every storage: noticed, repacked
        model(random_batch(1, 7))
    model(random_batch(1, 8))  # gradients on: training
    assert calls == [packed.FEW_TOKENS, 7]


@pytest.mark.parametrize("stream", ["concept", "type", "segment"])
def test_an_id_beyond_its_table_is_refused_on_the_packed_path(stream: str) -> None:
    model = _model()
    batch = random_batch(1, 3)
    getattr(batch, stream)[0, 1] = 10**6
    with torch.no_grad(), pytest.raises(IndexError, match=f"{stream} id 1000000"):
        model(batch)
    getattr(batch, stream)[0, 1] = -1
    with torch.no_grad(), pytest.raises(IndexError, match=f"{stream} id -1"):
        model(batch)


def test_a_negative_visit_order_is_refused_and_a_large_one_clamped_on_the_packed_path() -> None:
    model = _model()
    batch = random_batch(1, 3)
    batch.visit_order[0, 1] = 10**6  # shares the last row, as ``Embeddings`` clamps it
    with torch.no_grad():
        packed_hidden = model(batch)[0]
        batch.visit_order[0, 1] = 8
        assert torch.equal(model(batch)[0], packed_hidden)
        batch.visit_order[0, 1] = -1
        with pytest.raises(IndexError, match="visit_order id -1"):
            model(batch)


def test_streams_of_other_dtypes_and_layouts_give_the_same_numbers() -> None:
    """int32 ids, float64 times and column slices of wider tensors are read as they are,
    converted as ``Embeddings`` converts them."""
    model = _model()
    wide = random_batch(1, 8, seed=7)
    batch = TokenBatch(*(getattr(wide, f)[:, ::2] for f in TokenBatch.__dataclass_fields__))
    other = TokenBatch(
        concept=batch.concept.int(), type=batch.type.int(), age=batch.age.double(),
        time=batch.time.double().requires_grad_(), segment=batch.segment.short(),
        visit_order=batch.visit_order.int(),
    )  # fmt: skip
    with torch.no_grad():
        want = model(TokenBatch(*(t.contiguous() for t in vars(batch).values())))[0]
        assert not batch.concept.is_contiguous()
        assert torch.equal(model(batch)[0], want)
        assert torch.equal(model(other)[0], want)


def test_inputs_that_do_not_fit_are_refused_before_the_kernel_reads_them() -> None:
    """The kernel indexes without bounds checks; these must fail in Python instead."""
    model = _model()
    with torch.no_grad():
        _, two_rows, _ = model(random_batch(2, 3))
        with pytest.raises(ValueError, match="start conv state has shape"):
            model(random_batch(3, 4), two_rows)
        with pytest.raises(ValueError, match="captured position"):
            model(random_batch(1, 4), capture=torch.tensor([[4]]))
        with pytest.raises(ValueError, match="capture has shape"):
            model(random_batch(1, 4), capture=torch.tensor([[1], [2]]))
        with pytest.raises(ValueError, match="parent has shape"):
            model(random_batch(1, 4), parent=torch.tensor([[-1, 0, 1]]))


def test_a_parent_that_is_not_earlier_is_refused_on_the_packed_path() -> None:
    model = _model()
    with torch.no_grad(), pytest.raises(ValueError, match="earlier position"):
        model(random_batch(1, 3), parent=torch.tensor([[-1, 1, 1]]))
