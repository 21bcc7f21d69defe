"""The compiled kernels against plain PyTorch: the vectorisable exp, softplus and SiLU
(``model.fastmath``), the fused convolution + SiLU (``model.conv``), and the scan with its
time step's softplus and the output gate in the same pass (``model.scan.fast_scan``)."""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.nn.functional as F

from model import fastmath, scan
from model.branches import Branches
from model.conv import causal_conv, fast_causal_conv_silu

TOL = 2e-5


@numba.njit(fastmath=True, error_model="numpy")
def _apply(x: npt.NDArray[np.float32], which: int) -> npt.NDArray[np.float32]:
    out = np.empty_like(x)
    for i in range(x.size):
        if which == 0:
            out[i] = fastmath.exp(x[i])
        elif which == 1:
            out[i] = fastmath.softplus(x[i])
        else:
            out[i] = fastmath.silu(x[i])
    return out


def test_exp_is_as_precise_as_its_float32_argument_allows() -> None:
    x = np.linspace(-87, 88, 1_000_001, dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    error = np.abs(_apply(x, 0) / exact - 1)
    assert (error <= 1.5e-7 * np.maximum(1, np.abs(x))).all()
    assert _apply(np.array([-200.0, -87.5], np.float32), 0).max() < 1.2e-38  # no overflow


def test_softplus_and_silu_match_float64() -> None:
    x = np.linspace(-80, 80, 1_000_001, dtype=np.float32)
    exact = F.softplus(torch.from_numpy(x).double()).numpy()
    softplus = _apply(x, 1)
    assert (np.abs(softplus / exact - 1) < 5e-6).all()  # keeps its precision far below 0
    assert np.array_equal(softplus[x > 20], x[x > 20])  # linear above torch's threshold
    exact_silu = F.silu(torch.from_numpy(x).double()).numpy()
    assert (np.abs(_apply(x, 2) - exact_silu) <= 1e-6 * np.maximum(1, np.abs(x))).all()


@pytest.mark.parametrize("bias", [True, False])
def test_fused_convolution_equals_pytorch_on_chains_and_trees(bias: bool) -> None:
    g = torch.Generator().manual_seed(2)
    b, length, d, kernel = 2, 9, 24, 4
    conv_in = torch.randn(b, kernel - 1 + length, d, generator=g)
    weight = torch.randn(d, kernel, generator=g)
    offset = torch.randn(d, generator=g) if bias else None
    branches = Branches.of(torch.tensor([[-1, 0, 1, 2, 1, 4, 0, 6, -1], list(range(-1, 8))]),
                           kernel)  # fmt: skip
    for tree in (None, branches):
        want = F.silu(causal_conv(conv_in, weight, offset, tree))
        got = fast_causal_conv_silu(conv_in, weight, offset, tree)
        assert (got - want).abs().max().item() < TOL


def _inputs(b: int, length: int, d: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(b, length, 2 * d, generator=g)  # u and the gate: strided views of one
    return {
        "u": xz[..., :d],
        "gate": xz[..., d:],
        "raw": torch.randn(b, length, d, generator=g) * 2,
        "bias": torch.randn(d, generator=g),
        "A": -torch.exp(torch.randn(d, n, generator=g)),
        "B": torch.randn(b, length, n, generator=g),
        "C": torch.randn(b, length, n, generator=g),
        "D": torch.randn(d, generator=g),
        "h0": torch.randn(b, d, n, generator=g),
    }


def test_rows_read_column_slices_in_place_and_copy_what_they_cannot() -> None:
    """``as_rows`` hands the kernel the gate half of in_proj's output (and B, C of
    x_proj's) as the wider rows they lie in, without a copy; anything else is copied."""
    xz = torch.randn(2, 5, 12)
    for part, at in ((xz[..., 4:10], 4), (xz[..., :3], 0), (xz, 0)):
        rows, offset = fastmath.as_rows(part)
        assert offset == at
        assert np.shares_memory(rows, xz.numpy())
        assert rows.flags.c_contiguous
        assert np.array_equal(rows[..., offset : offset + part.shape[-1]], part.numpy())
    later = xz[1:, :, 4:10]  # starts one row of the batch in: still in place
    rows, offset = fastmath.as_rows(later)
    assert np.shares_memory(rows, xz.numpy())
    assert np.array_equal(rows[..., offset : offset + 6], later.numpy())
    for other in (xz[:, ::2, 4:10], xz.transpose(1, 2), xz.double()[..., 4:10]):
        rows, offset = fastmath.as_rows(other)
        assert offset == 0
        assert not np.shares_memory(rows, xz.numpy())
        assert np.array_equal(rows, other.float().numpy())
    padded, offset = fastmath.as_rows(xz[..., 4:10], pad=2)
    assert (offset, padded.shape) == (0, (2, 5, 8))
    assert np.array_equal(padded[..., :6], xz[..., 4:10].numpy())
    assert not padded[..., 6:].any()


@pytest.mark.parametrize("d", [scan.LANES, 24], ids=["whole-lanes", "padded-lanes"])
def test_scan_with_softplus_and_gate_fused_equals_the_reference(d: int) -> None:
    """Inputs as the block passes them (column slices of wider rows, read in place) and a
    width that is not a multiple of the kernel's lanes (padded)."""
    x = _inputs(2, 75, d, 16, seed=3)
    delta = F.softplus(x["raw"] + x["bias"])
    y_ref, h_ref, _ = scan.reference_scan(x["u"], delta, x["A"], x["B"], x["C"], x["D"], x["h0"])
    y, h, _ = scan.fast_scan(
        x["u"], x["raw"], x["A"], x["B"], x["C"], x["D"], x["h0"],
        delta_bias=x["bias"], gate=x["gate"],
    )  # fmt: skip
    assert (d % scan.LANES == 0) == (d == scan.LANES)
    assert torch.allclose(y, y_ref * F.silu(x["gate"]), rtol=1e-5, atol=TOL)
    assert torch.allclose(h, h_ref, rtol=1e-5, atol=TOL)


def test_branches_and_captures_far_back() -> None:
    """Branches whose parents lie many steps back, a branch continued, and captures on
    the chain and on branches."""
    x = _inputs(1, 74, 16, 4, seed=4)
    delta = F.softplus(x["raw"])
    # 0..70 a chain; 71 branches off 5 (65 steps back), 72 continues 71; 73 branches off 33.
    tree = torch.tensor([[*range(-1, 70), 5, 71, 33]])
    capture = torch.tensor([[31, 63, 70, 72, 73, -1]])
    args = (x["u"], delta, x["A"], x["B"], x["C"], x["D"], x["h0"], capture, tree)
    y_ref, h_ref, cap_ref = scan.reference_scan(*args)
    y, h, cap = scan.fast_scan(*args)
    assert cap is not None
    assert cap_ref is not None
    assert (y - y_ref).abs().max().item() < TOL
    assert (h - h_ref).abs().max().item() < TOL
    assert (cap - cap_ref).abs().max().item() < TOL
    assert cap[0, -1].abs().max().item() == 0  # -1 asks for nothing
