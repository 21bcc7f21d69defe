"""Our Mamba against the reference implementation (``transformers.MambaModel``), and our
execution paths (parallel, step, continue-from-state, captured states) against each other."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaModel

from model import scan
from model.config import ModelConfig
from model.interop import to_transformers
from model.network import EHRMamba, TokenBatch
from model.state import ModelState
from tests.model.paths import SCAN_PATHS, use_scan_path
from tests.model.random_batches import VOCAB, random_batch

TOL = 2e-5


def _config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, dropout=0.0)


def _slice(batch: TokenBatch, start: int, stop: int, rows: slice = slice(None)) -> TokenBatch:
    return TokenBatch(
        *(getattr(batch, f)[rows, start:stop] for f in TokenBatch.__dataclass_fields__)
    )


@pytest.fixture(scope="module")
def model() -> EHRMamba:
    torch.manual_seed(0)
    return EHRMamba(_config()).eval()


def test_backbone_weights_load_into_transformers_and_back(model: EHRMamba) -> None:
    reference = to_transformers(model)
    copy = EHRMamba(model.config).eval()
    copy.backbone.load_state_dict(reference.state_dict(), strict=True)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(copy.backbone.state_dict()[name], tensor), name


@pytest.mark.parametrize("path", SCAN_PATHS)
def test_full_forward_matches_transformers(
    model: EHRMamba, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grad = use_scan_path(monkeypatch, path)
    reference = to_transformers(model)
    assert isinstance(reference, MambaModel)
    batch = random_batch(2, 150)  # crosses a fast-scan chunk boundary
    with torch.no_grad():
        expected = reference(inputs_embeds=model.input_embeddings(batch)).last_hidden_state
    with torch.set_grad_enabled(grad):
        ours, _, _ = model(batch)
    assert (ours - expected).abs().max().item() < TOL


def test_chunk_size_that_does_not_divide_the_length(
    model: EHRMamba, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training scan checkpoints every CHUNK steps (a capture at each chunk end); 50
    tokens in chunks of 7 give the same forward as one chunk, and as inference."""
    batch = random_batch(2, 50)
    with torch.no_grad():
        inference, _, _ = model(batch)
    whole, _, _ = model(batch)
    monkeypatch.setattr(scan, "CHUNK", 7)
    chunked, _, _ = model(batch)
    assert 50 % 7
    assert (whole - chunked).abs().max().item() < TOL
    assert (inference - chunked).abs().max().item() < TOL


def test_fast_scan_matches_the_reference_from_a_state() -> None:
    g = torch.Generator().manual_seed(1)
    b, length, d, n = 2, 40, 8, 4
    u = torch.randn(b, length, d, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, length, d, generator=g))
    A = -torch.exp(torch.randn(d, n, generator=g))
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D, h0 = torch.randn(d, generator=g), torch.randn(b, d, n, generator=g)
    y_ref, h_ref, _ = scan.reference_scan(u, delta, A, B, C, D, h0)
    y, h, _ = scan.fast_scan(u, delta, A, B, C, D, h0)
    assert (y - y_ref).abs().max().item() < TOL
    assert (h - h_ref).abs().max().item() < TOL


def test_step_by_step_equals_the_parallel_forward(model: EHRMamba, inference_path: str) -> None:
    batch = random_batch(2, 25)
    with torch.no_grad():
        whole, end, _ = model(batch)
        state: ModelState | None = None
        outs = []
        for t in range(25):
            out, state, _ = model(_slice(batch, t, t + 1), state)
            outs.append(out)
    assert (torch.cat(outs, dim=1) - whole).abs().max().item() < TOL
    assert state is not None
    for a, b in zip(state.layers, end.layers, strict=True):
        assert (a.ssm - b.ssm).abs().max().item() < TOL
        assert torch.allclose(a.conv, b.conv, atol=TOL)


@pytest.mark.parametrize("split", [1, 3, 17, 39])
def test_continue_from_state_equals_the_whole(
    model: EHRMamba, split: int, inference_path: str
) -> None:
    batch = random_batch(2, 40)
    with torch.no_grad():
        whole, end, _ = model(batch)
        head, state, _ = model(_slice(batch, 0, split))
        tail, resumed, _ = model(_slice(batch, split, 40), state)
    assert (torch.cat([head, tail], dim=1) - whole).abs().max().item() < TOL
    for a, b in zip(resumed.layers, end.layers, strict=True):
        assert (a.ssm - b.ssm).abs().max().item() < TOL


def test_captured_states_equal_prefix_runs_and_ignore_padding(
    model: EHRMamba, inference_path: str
) -> None:
    """Row 1 is a 12-token sequence right-padded to 30; its capture at 11 must equal the
    state of the 12 tokens alone, whatever the padding does after it."""
    batch = random_batch(2, 30)
    capture = torch.tensor([[4, 29], [11, -1]])
    with torch.no_grad():
        _, _, captured = model(batch, capture=capture)
        _, alone, _ = model(_slice(batch, 0, 12, slice(1, 2)))
        _, prefix, _ = model(_slice(batch, 0, 5, slice(0, 1)))
    assert captured is not None
    for layer, (cap, solo, pre) in enumerate(
        zip(captured.layers, alone.layers, prefix.layers, strict=True)
    ):
        assert (cap.ssm[1, 0] - solo.ssm[0]).abs().max().item() < TOL, layer
        assert torch.allclose(cap.conv[1, 0], solo.conv[0], atol=TOL), layer
        assert (cap.ssm[0, 0] - pre.ssm[0]).abs().max().item() < TOL, layer
        assert torch.count_nonzero(cap.ssm[1, 1]) == 0, "-1 captures nothing"


@pytest.mark.parametrize("chunk", [7, 128], ids=["many-chunks", "one-chunk"])
def test_compiled_scan_gradients_equal_autograd_through_the_reference(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan, "CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    b, length, d, n = 2, 30, 6, 4
    inputs = [
        torch.randn(b, length, d, generator=g),
        torch.nn.functional.softplus(torch.randn(b, length, d, generator=g)),
        -torch.exp(torch.randn(d, n, generator=g)),
        torch.randn(b, length, n, generator=g),
        torch.randn(b, length, n, generator=g),
        torch.randn(d, generator=g),
        torch.randn(b, d, n, generator=g),
    ]
    # Crosses chunks; -1 captures nothing; two columns may ask for one position (training
    # gives every prompt its own column, and several tasks share the end of a record); 13
    # and 20 are chunk ends at CHUNK 7, where the backward keeps its checkpoints.
    capture = torch.tensor([[3, -1, 17, 13, 17], [29, 0, 8, 8, 20]])
    weights = (
        torch.randn(b, length, d, generator=g),
        torch.randn(b, d, n, generator=g),
        torch.randn(b, capture.shape[1], d, n, generator=g),
    )
    grads, states = [], []
    for fn in (scan.reference_scan, scan.compiled_scan):
        leaves = [x.clone().requires_grad_() for x in inputs]
        u, delta, A, B, C, D, h0 = leaves
        y, h, captured = fn(u, delta, A, B, C, D, h0, capture)
        assert captured is not None
        loss = (y * weights[0]).sum() + (h * weights[1]).sum() + (captured * weights[2]).sum()
        loss.backward()
        grads.append([leaf.grad for leaf in leaves])
        states.append(captured.detach())
    assert (states[0] - states[1]).abs().max().item() < 1e-5, "captured states"
    for name, want, got in zip(["u", "delta", "A", "B", "C", "D", "h0"], *grads, strict=True):
        assert want is not None
        assert got is not None
        assert (want - got).abs().max().item() < 1e-4, name


def test_training_gradients_match_the_reference_path(
    model: EHRMamba, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parameter gradients of a next-token loss: compiled backward against autograd."""
    batch = random_batch(2, 20)
    results = []
    for use_reference in (True, False):
        if use_reference:
            monkeypatch.setattr(scan, "compiled_scan", scan.reference_scan)
        else:
            monkeypatch.undo()
        model.zero_grad()
        hidden, _, _ = model(batch)
        model.next_token_logits(hidden).logsumexp(-1).mean().backward()
        results.append(
            {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        )
    reference, compiled = results
    assert reference.keys() == compiled.keys()
    for name, grad in reference.items():
        assert torch.allclose(compiled[name], grad, atol=1e-5, rtol=1e-4), name
