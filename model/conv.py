"""The block's causal depthwise convolution, in two implementations that agree.

Shape letters: b batch, l row length, d channels, K kernel width, m tokens off the plain
chain (``model.branches``).

Each channel sees its own last K inputs: conv_t = bias + sum_k weight[:, k] * x_{t-K+1+k}.
Both take ``conv_in`` (b, K-1+l, d): the K-1 inputs saved in the start state, then the
row's inputs, so a sequence continues across calls; along a token tree a token's window
follows its own path (``Branches.windows``).

- ``causal_conv``: PyTorch, differentiable (training), any device. Time-major, K shifted
  multiply-adds over contiguous (l, d) rows: cheaper on CPU than transposing to
  ``conv1d``'s (d, l) layout and back.
- ``fast_causal_conv_silu``: compiled, no gradients, CPU; the convolution and the SiLU
  after it in one pass over the output instead of 2K+2 tensor operations, which is most
  of the cost for the few tokens of an incremental update.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt
import torch

from model import fastmath
from model.branches import Branches


def causal_conv(
    conv_in: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    branches: Branches | None = None,
) -> torch.Tensor:  # fmt: skip
    """conv_in (b, K-1+l, d), weight (d, K), bias (d,) or None -> (b, l, d), before SiLU."""
    kernel = weight.shape[1]
    length = conv_in.shape[1] - (kernel - 1)
    conv = conv_in[:, :length] * weight[:, 0]
    for k in range(1, kernel):
        conv = conv + conv_in[:, k : k + length] * weight[:, k]
    if branches is not None and branches.rows.numel():  # tokens off the plain chain
        rows = branches.rows.to(conv_in.device)
        window = conv_in[rows.unsqueeze(1), branches.off_windows.to(conv_in.device)]  # (m, K, d)
        conv[rows, branches.positions.to(conv_in.device)] = (window * weight.t()).sum(1)
    if bias is not None:
        conv = conv + bias
    return conv


def fast_causal_conv_silu(
    conv_in: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    branches: Branches | None = None,
) -> torch.Tensor:  # fmt: skip
    """SiLU(causal_conv(...)), compiled, no gradients. Shapes as ``causal_conv``."""
    with torch.no_grad():
        b, total, d = conv_in.shape
        kernel = weight.shape[1]
        length = total - (kernel - 1)
        source = fastmath.as_array(conv_in)
        taps = fastmath.as_array(weight.t())  # (K, d)
        offset = fastmath.as_array(bias) if bias is not None else np.zeros(d, np.float32)
        windows = (
            branches.windows.numpy()
            if branches is not None
            else np.empty((b, 0, kernel), dtype=np.int64)
        )
        out = np.empty((b, length, d), dtype=np.float32)
        _conv_silu(source, taps, offset, windows, out)
        return torch.from_numpy(out)


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _conv_silu(
    conv_in: npt.NDArray[np.float32],  # (b, K-1+l, d)
    taps: npt.NDArray[np.float32],  # (K, d)
    bias: npt.NDArray[np.float32],  # (d,)
    windows: npt.NDArray[np.int64],  # (b, l, K) conv_in rows per token; (b, 0, K): plain
    out: npt.NDArray[np.float32],  # (b, l, d), written
) -> None:
    nb, steps, nd = out.shape
    kernel = taps.shape[0]
    tree = windows.shape[1] > 0
    for job in numba.prange(nb * steps):
        bi = job // steps
        t = job % steps
        row = out[bi, t]
        row[:] = bias
        for k in range(kernel):
            source = conv_in[bi, windows[bi, t, k] if tree else t + k]
            tap = taps[k]
            for di in range(nd):
                row[di] += source[di] * tap[di]
        for di in range(nd):
            row[di] = fastmath.silu(row[di])
