"""The selective scan, the heart of Mamba, in two implementations that agree.

Shape letters used in every docstring here:
    b  batch          l  sequence length     d  channels (the block's intermediate size)
    n  state size     k  captured positions per sequence

The recurrence (Mamba paper, eq. 2a-2b, with the zero-order-hold discretisation of
section 2 and the simplified B of its appendix):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (d, n)
    y_t = C_t . h_t + D * u_t                                      y: (d,)

- ``reference_scan`` is a plain loop over time in PyTorch: differentiable, obviously right,
  slow (one small operation per step).
- ``cuda_scan`` is ``mamba-ssm``'s fused CUDA kernel, used on GPUs when that optional
  package is installed (it takes no initial state, so continuing a sequence on a GPU still
  uses the reference path).
- ``fast_scan`` computes ``exp(delta * A)`` with torch's vectorised exp for a cache-sized
  chunk of steps, then runs the recurrence over that chunk in a compiled loop (numba, one
  parallel task per (batch, channel)). It also returns the state after any requested
  positions ("captures"), which is how the engine gets the state at each task's cut point
  from one pass, and why right-padding never disturbs a state that is used.
It is inference-only (no gradients).
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt
import torch

CHUNK = 128  # time steps per exp() batch: keeps the (b, chunk, d, n) buffer in cache

try:  # optional CUDA extra: pip install mamba-ssm (builds from source against your torch)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None


def _mamba_ssm_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mamba-ssm``'s kernel with our layout: u, delta (b, l, d); B, C (b, l, n); from a
    zero state. Returns y (b, l, d) and the last state (b, d, n). Differentiable."""
    assert selective_scan_fn is not None
    y, last = selective_scan_fn(
        u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
        return_last_state=True,
    )  # fmt: skip
    return y.transpose(1, 2), last


# The CUDA kernel in use; None (no mamba-ssm, or set so to compare) means the PyTorch path.
cuda_scan = _mamba_ssm_scan if selective_scan_fn is not None else None


def reference_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable scan. u, delta: (b, l, d); A: (d, n); B, C: (b, l, n); D: (d,);
    h0: (b, d, n) or None for zeros. Returns y (b, l, d) and the last state (b, d, n)."""
    b, length, d = u.shape
    n = A.shape[1]
    h = h0 if h0 is not None else u.new_zeros(b, d, n)
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d, n)
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (b, l, d, n)
    ys = []
    for t in range(length):
        h = decay[:, t] * h + drive[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(b, 0, d)
    return y + u * D, h


def fast_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
    capture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Compiled scan, no gradients. Shapes as ``reference_scan``; ``capture`` (b, k) holds
    positions t (state after step t; -1 for none). Returns y (b, l, d), last state (b, d, n)
    and the captured states (b, k, d, n), zeros where the position was -1."""
    with torch.no_grad():
        b, length, d = u.shape
        n = A.shape[1]
        u32 = _np(u)
        delta32 = _np(delta)
        B32, C32 = _np(B), _np(C)
        D32 = _np(D)
        h = _np(h0).copy() if h0 is not None else np.zeros((b, d, n), dtype=np.float32)
        y = np.empty((b, length, d), dtype=np.float32)
        slots = np.full((b, length), -1, dtype=np.int64)
        k = 0
        if capture is not None:
            positions = capture.cpu().numpy().astype(np.int64)
            k = positions.shape[1]
            for row, col in zip(*np.nonzero(positions >= 0), strict=True):
                slots[row, positions[row, col]] = col
        captured = np.zeros((b, max(k, 1), d, n), dtype=np.float32)
        A_t = A.detach().float()
        delta_t = torch.from_numpy(delta32)
        buffer = torch.empty(b, min(CHUNK, length), d, n)  # reused: exp(delta * A) per chunk
        for start in range(0, length, CHUNK):
            stop = min(start + CHUNK, length)
            decay = buffer[:, : stop - start]
            torch.mul(delta_t[:, start:stop].unsqueeze(-1), A_t, out=decay)
            decay.exp_()
            _scan_chunk(
                decay.numpy(), u32[:, start:stop], delta32[:, start:stop],
                B32[:, start:stop], C32[:, start:stop], D32, h, y[:, start:stop],
                slots[:, start:stop], captured,
            )  # fmt: skip
        out_captured = torch.from_numpy(captured[:, :k]) if capture is not None else None
        return torch.from_numpy(y), torch.from_numpy(h), out_captured


def _np(x: torch.Tensor) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


@numba.njit(parallel=True, cache=True, fastmath=True)
def _scan_chunk(
    decay: npt.NDArray[np.float32],  # (b, T, d, n)
    u: npt.NDArray[np.float32],  # (b, T, d)
    delta: npt.NDArray[np.float32],  # (b, T, d)
    B: npt.NDArray[np.float32],  # (b, T, n)
    C: npt.NDArray[np.float32],  # (b, T, n)
    D: npt.NDArray[np.float32],  # (d,)
    h: npt.NDArray[np.float32],  # (b, d, n), updated in place
    y: npt.NDArray[np.float32],  # (b, T, d), written
    slots: npt.NDArray[np.int64],  # (b, T): capture slot or -1
    captured: npt.NDArray[np.float32],  # (b, k, d, n), written at slots
) -> None:
    nb, steps, nd, nn = decay.shape
    for job in numba.prange(nb * nd):
        bi = job // nd
        di = job % nd
        state = h[bi, di].copy()
        for t in range(steps):
            drive = delta[bi, t, di] * u[bi, t, di]
            acc = 0.0
            for ni in range(nn):
                state[ni] = decay[bi, t, di, ni] * state[ni] + drive * B[bi, t, ni]
                acc += C[bi, t, ni] * state[ni]
            y[bi, t, di] = acc + D[di] * u[bi, t, di]
            slot = slots[bi, t]
            if slot >= 0:
                captured[bi, slot, di, :] = state
        h[bi, di] = state
