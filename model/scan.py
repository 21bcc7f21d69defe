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
- ``fast_scan`` runs the recurrence in one compiled loop (numba, one parallel task per
  (batch, group of 64 channels)) that computes ``exp(delta * A)`` as it goes, adjacent
  channels side by side in vectors (``model.fastmath``); the time step's softplus and the
  block's output gate ride in the same pass. It also returns the state after any requested
  positions ("captures"), which is how the engine gets the state at each task's cut point
  from one pass, and why right-padding never disturbs a state that is used. A row can be a
  token tree (``parent``, see ``model.branches``): a branching step loads the state it
  continues from a capture slot.
Training uses ``compiled_scan``: the same forward, plus a compiled backward that
recomputes each chunk's states from a checkpoint and runs the reverse recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
import torch

from model import fastmath
from model.fastmath import as_array, as_rows

# Channels per parallel job of the forward kernel, scanned side by side as whole vectors
# (four AVX-512 registers; the compiler unrolls loops of this fixed count). Fixed, so the
# loops over them vectorise fully; a width that is not a multiple is padded with inert
# channels. Eight jobs per row of the compact size keep eight cores busy at batch 1.
LANES = 64
# Time steps per checkpoint of the backward; its exp(delta * A) per chunk stays in cache.
CHUNK = 128
# The backward's parallel jobs per batch row: each walks a slice of the channels and sums
# dB and dC (which every channel adds to) into its own partial, so no job writes what
# another writes and no (b, d, chunk, n) intermediate is ever made.
D_GROUPS = 32

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
    capture: torch.Tensor | None = None,
    parent: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Differentiable scan. u, delta: (b, l, d); A: (d, n); B, C: (b, l, n); D: (d,);
    h0: (b, d, n) or None for zeros; capture (b, k): positions t whose state (after step t)
    to return, -1 for none; parent (b, l): the position each step continues from (a token
    tree, ``model.branches``), None for plain sequences. Returns y (b, l, d), the state
    after the last step (b, d, n) and the captured states (b, k, d, n) (zeros at -1), or
    None without ``capture``."""
    b, length, d = u.shape
    n = A.shape[1]
    h = h0 if h0 is not None else u.new_zeros(b, d, n)
    start = h
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d, n)
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (b, l, d, n)
    ys: list[torch.Tensor] = []
    hs: list[torch.Tensor] = []
    for t in range(length):
        if parent is not None and bool((parent[:, t] != t - 1).any()):  # a branching step
            h = torch.stack(
                [hs[p][r] if p >= 0 else start[r] for r, p in enumerate(parent[:, t].tolist())]
            )
        h = decay[:, t] * h + drive[:, t]
        hs.append(h)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(b, 0, d)
    captured = None
    if capture is not None:
        every = torch.stack(hs, dim=1)  # (b, l, d, n)
        rows = torch.arange(b).unsqueeze(1)
        captured = every[rows, capture.clamp(min=0)] * (capture >= 0).view(*capture.shape, 1, 1)
    return y + u * D, h, captured


def fast_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
    capture: torch.Tensor | None = None,
    parent: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    plan: SlotPlan | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Compiled scan, no gradients. Shapes as ``reference_scan``; ``capture`` (b, k) holds
    positions t (state after step t; -1 for none); ``parent`` (b, l) makes each row a token
    tree. Returns y (b, l, d), the state after the last step (b, d, n) and the captured
    states (b, k, d, n), zeros where the position was -1.

    Two steps of the block can ride in the scan's pass, as in ``mamba-ssm``'s kernel:
    with ``delta_bias`` (d,), ``delta`` is the time-step projection before its bias and
    softplus, and the scan uses softplus(delta + delta_bias); ``gate`` (b, l, d) multiplies
    y by SiLU(gate), the block's output gate. ``plan``: ``SlotPlan.of(capture, parent, b,
    l)``, made once for every block of a forward; made here if not given.
    """
    with torch.no_grad():
        b, length, d = u.shape
        n = A.shape[1]
        if plan is None:
            plan = SlotPlan.of(capture, parent, b, length)
        pad = -d % LANES  # channels are scanned LANES at a time; pad with inert ones
        bias = delta_bias if delta_bias is not None else torch.zeros(d)
        gates = gate if gate is not None else u.new_empty(b, 0, d)
        h = (
            as_array(h0, pad, axis=1).copy()
            if h0 is not None
            else np.zeros((b, d + pad, n), np.float32)
        )
        y = np.empty((b, length, d + pad), dtype=np.float32)
        states = np.zeros((b, plan.width, d + pad, n), dtype=np.float32)
        for row, slot in plan.from_start:  # branches off the start state read it from a slot
            states[row, slot] = h[row]
        _scan_forward(
            as_rows(u, pad), as_rows(delta, pad), as_array(A, pad, axis=0), as_rows(B),
            as_rows(C), as_array(D, pad), as_array(bias, pad), delta_bias is not None,
            as_rows(gates, pad), h, y, plan.slots, plan.load, states,
        )  # fmt: skip
        captured = plan.per_column(states, d) if capture is not None else None
        return (
            torch.from_numpy(y[:, :, :d]),
            torch.from_numpy(h[:, :d]),
            torch.from_numpy(captured) if captured is not None else None,
        )


class _CompiledScan(torch.autograd.Function):
    """The compiled scan with a compiled backward: the reverse recurrence (Mamba paper,
    appendix: the gradient of a linear recurrence is a linear recurrence run backwards).

    Forward keeps only the state at each chunk start; backward recomputes a chunk's states
    from its checkpoint, then walks it in reverse. Memory stays O(length / CHUNK) states.
    Captured states (the state after chosen positions, where training reads a task token's
    branch) are outputs too: their gradients join the reverse walk at their positions.
    """

    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        h0: torch.Tensor,
        capture: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = u.shape
        starts = list(range(0, length, CHUNK))
        chunk_ends = torch.tensor([[s - 1 for s in starts[1:]]] * b, dtype=torch.int64)
        wanted = torch.cat([chunk_ends.view(b, -1), capture], dim=1)
        y, h, states = fast_scan(u, delta, A, B, C, D, h0, wanted if wanted.numel() else None)
        first = h0.detach().float().unsqueeze(1)
        k_chunks = len(starts) - 1
        saved = first if states is None else torch.cat([first, states[:, :k_chunks]], dim=1)
        captured = states[:, k_chunks:] if states is not None else u.new_zeros(b, 0, *h.shape[1:])
        ctx.save_for_backward(u, delta, A, B, C, D, saved, capture)
        ctx.mark_non_differentiable(capture)
        return y, h, captured

    @staticmethod
    def backward(
        ctx: Any,
        dy: torch.Tensor,
        dh_last: torch.Tensor | None,
        dcaptured: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, D, checkpoints, capture = ctx.saved_tensors
        b, length, d = u.shape
        n = A.shape[1]
        u32, delta32, B32, C32 = (as_array(x) for x in (u, delta, B, C))
        A32, D32, dy32 = (as_array(x) for x in (A, D, dy))
        dh = as_array(dh_last).copy() if dh_last is not None else np.zeros((b, d, n), np.float32)
        plan = SlotPlan.of(capture, None, b, length)
        dcap = np.zeros((b, plan.width, d, n), np.float32)  # per slot: columns summed
        if dcaptured is not None:
            plan.add_per_slot(as_array(dcaptured), dcap)
        du = np.empty((b, length, d), np.float32)
        ddelta = np.empty((b, length, d), np.float32)
        dB = np.empty((b, length, n), np.float32)
        dC = np.empty((b, length, n), np.float32)
        dA_part = np.zeros((b, d, n), np.float32)
        dD_part = np.zeros((b, d), np.float32)
        A_t = A.detach().float()
        saved = as_array(checkpoints)
        groups = min(D_GROUPS, d)
        for index in reversed(range(saved.shape[1])):
            start = index * CHUNK
            stop = min(start + CHUNK, length)
            steps = stop - start
            decay = torch.exp(torch.from_numpy(delta32[:, start:stop]).unsqueeze(-1) * A_t)
            dB_part = np.zeros((b, groups, steps, n), np.float32)
            dC_part = np.zeros((b, groups, steps, n), np.float32)
            chunk_slots = plan.slots[:, start:stop]
            _scan_chunk_backward(
                decay.numpy(), u32[:, start:stop], delta32[:, start:stop], A32,
                B32[:, start:stop], C32[:, start:stop], D32, saved[:, index],
                dy32[:, start:stop], dh, np.ascontiguousarray(chunk_slots), dcap,
                du[:, start:stop], ddelta[:, start:stop], dA_part, dB_part, dC_part, dD_part,
            )  # fmt: skip
            dB[:, start:stop] = dB_part.sum(axis=1)
            dC[:, start:stop] = dC_part.sum(axis=1)
        grads = (du, ddelta, dA_part.sum(axis=0), dB, dC, dD_part.sum(axis=0), dh)
        like = (u, delta, A, B, C, D, u)
        out = tuple(torch.from_numpy(g).to(x.dtype) for g, x in zip(grads, like, strict=True))
        return (*out, None)


def compiled_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
    capture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The compiled scan with gradients (CPU). Shapes and results as ``fast_scan``,
    captured states included (and differentiable)."""
    b, _, d = u.shape
    start = h0 if h0 is not None else u.new_zeros(b, d, A.shape[1])
    wanted = capture if capture is not None else torch.zeros(b, 0, dtype=torch.int64)
    y, h, captured = _CompiledScan.apply(u, delta, A, B, C, D, start, wanted)  # type: ignore[no-untyped-call]
    return y, h, captured if capture is not None else None


@dataclass(frozen=True)
class SlotPlan:
    """Where the compiled kernels keep the states that are asked for.

    A slot holds the state after one position of one row, however many capture columns ask
    for it (training gives every prompt its own column, and several tasks share the end of
    a record; the backward's chunk checkpoints can fall on a prompt too), and however many
    branching steps continue it. ``slots`` (b, l): the slot written after each position, -1
    for none; ``columns`` (b, k): each capture column's slot, -1 for none; ``load`` (b, l):
    the slot a branching step starts from, -1 where a step continues the step before;
    ``from_start``: (row, slot) pairs that hold the row's start state (position -1, which
    no step writes: the caller fills them); ``width``: slots per row (at least 1).
    """

    slots: npt.NDArray[np.int64]
    columns: npt.NDArray[np.int64]
    load: npt.NDArray[np.int64]
    from_start: list[tuple[int, int]]
    width: int

    @classmethod
    def of(cls, capture: torch.Tensor | None, parent: torch.Tensor | None, b: int,
           length: int) -> SlotPlan:  # fmt: skip
        """capture (b, k) positions (-1 none) or None; parent (b, l) or None."""
        asked = capture.cpu().numpy() if capture is not None else np.zeros((b, 0), np.int64)
        slots = np.full((b, length), -1, dtype=np.int64)
        columns = np.full(asked.shape, -1, dtype=np.int64)
        load = np.full((b, length), -1, dtype=np.int64)
        used = [0] * b
        start_slot: dict[int, int] = {}

        def slot_of(row: int, position: int) -> int:
            if position < 0:
                if row not in start_slot:
                    start_slot[row] = used[row]
                    used[row] += 1
                return start_slot[row]
            if slots[row, position] < 0:
                slots[row, position] = used[row]
                used[row] += 1
            return int(slots[row, position])

        for row, col in zip(*np.nonzero(asked >= 0), strict=True):
            columns[row, col] = slot_of(int(row), int(asked[row, col]))
        if parent is not None:
            par = parent.cpu().numpy()
            for row, t in zip(*np.nonzero(par != np.arange(length) - 1), strict=True):
                load[row, t] = slot_of(int(row), int(par[row, t]))
        return cls(slots, columns, load, sorted(start_slot.items()), max([1, *used]))

    def per_column(
        self, states: npt.NDArray[np.float32], channels: int | None = None
    ) -> npt.NDArray[np.float32]:
        """States per slot (b, width, d, ...) -> per capture column (b, k, d, ...), zeros
        at -1; ``channels``: keep only the first that many of d (the scan's padding)."""
        rows = np.arange(states.shape[0])[:, None]
        picked: npt.NDArray[np.float32] = states[rows, self.columns.clip(min=0), :channels]
        unused = self.columns < 0
        if unused.any():
            picked[unused] = 0
        return picked

    def add_per_slot(
        self, per_column: npt.NDArray[np.float32], out: npt.NDArray[np.float32]
    ) -> None:
        """Sum gradients per capture column (b, k, ...) into their slots (b, width, ...)."""
        rows, cols = np.nonzero(self.columns >= 0)
        np.add.at(out, (rows, self.columns[rows, cols]), per_column[rows, cols])


# A (b, l, w) float32 array and the column where a (b, l, c) input starts in it
# (``fastmath.as_rows``): column slices reach the kernel without a copy, yet C-contiguous.
Rows = tuple[npt.NDArray[np.float32], int]


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _scan_forward(
    u: Rows,  # (b, l, d), d a multiple of LANES
    delta: Rows,  # (b, l, d)
    A: npt.NDArray[np.float32],  # (d, n)
    B: Rows,  # (b, l, n)
    C: Rows,  # (b, l, n)
    D: npt.NDArray[np.float32],  # (d,)
    delta_bias: npt.NDArray[np.float32],  # (d,): added to delta before softplus
    softplus: bool,  # delta is the projection before bias and softplus
    gate: Rows,  # (b, l, d) multiplies y by SiLU(gate); (b, 0, d): none
    h: npt.NDArray[np.float32],  # (b, d, n), updated in place
    y: npt.NDArray[np.float32],  # (b, l, d), written
    slots: npt.NDArray[np.int64],  # (b, l): the slot written after each step, or -1
    load: npt.NDArray[np.int64],  # (b, l): slot of the state a branching step continues, or -1
    captured: npt.NDArray[np.float32],  # (b, slots, d, n): written at slots, read at load
) -> None:
    """One parallel job per (row, group of LANES channels), one time step after another.
    The state is held as (n, LANES), so every inner loop runs over LANES adjacent channels:
    a fixed count, which the compiler turns into whole vector operations, exp(delta * A)
    included (``fastmath.exp2`` of delta * A log2 e). No (b, l, d, n) decay tensor is ever
    written, and y needs no reduction across lanes.

    Each step reads its inputs straight from the rows (slices of LANES contiguous floats)
    into the loops that use them. Staging tiles of several steps into local buffers first,
    as an earlier version did, was slower (the whole forward 1.2x: docs/benchmarks.md)."""
    u_rows, u_at = u
    delta_rows, delta_at = delta
    b_rows, b_at = B
    c_rows, c_at = C
    gate_rows, gate_at = gate
    nb, steps, nd = y.shape
    nn = A.shape[1]
    groups = nd // LANES
    gated = gate_rows.shape[1] > 0
    for job in numba.prange(nb * groups):
        bi = job // groups
        d0 = (job % groups) * LANES
        state = np.empty((nn, LANES), np.float32)
        a = np.empty((nn, LANES), np.float32)  # A log2 e
        for ni in range(nn):
            for w in range(LANES):
                state[ni, w] = h[bi, d0 + w, ni]
                a[ni, w] = A[d0 + w, ni] * fastmath.LOG2E
        bias = delta_bias[d0 : d0 + LANES]
        skip = D[d0 : d0 + LANES]
        step = np.empty(LANES, np.float32)  # delta_t
        drive = np.empty(LANES, np.float32)  # delta_t * u_t
        out = np.empty(LANES, np.float32)  # y_t
        for t in range(steps):
            source = load[bi, t]
            if source >= 0:  # a branch: continue its parent's state, not the previous step's
                for ni in range(nn):
                    for w in range(LANES):
                        state[ni, w] = captured[bi, source, d0 + w, ni]
            raw = delta_rows[bi, t, delta_at + d0 : delta_at + d0 + LANES]
            inputs = u_rows[bi, t, u_at + d0 : u_at + d0 + LANES]
            if softplus:
                for w in range(LANES):
                    step[w] = fastmath.softplus(raw[w] + bias[w])
            else:
                for w in range(LANES):
                    step[w] = raw[w]
            for w in range(LANES):
                drive[w] = step[w] * inputs[w]
                out[w] = skip[w] * inputs[w]
            for ni in range(nn):
                b_t = b_rows[bi, t, b_at + ni]
                c_t = c_rows[bi, t, c_at + ni]
                for w in range(LANES):
                    s = fastmath.exp2(step[w] * a[ni, w]) * state[ni, w] + drive[w] * b_t
                    state[ni, w] = s
                    out[w] += c_t * s
            result = y[bi, t, d0 : d0 + LANES]
            if gated:
                z = gate_rows[bi, t, gate_at + d0 : gate_at + d0 + LANES]
                for w in range(LANES):
                    result[w] = out[w] * fastmath.silu(z[w])
            else:
                for w in range(LANES):
                    result[w] = out[w]
            slot = slots[bi, t]
            if slot >= 0:
                for ni in range(nn):
                    for w in range(LANES):
                        captured[bi, slot, d0 + w, ni] = state[ni, w]
        for ni in range(nn):
            for w in range(LANES):
                h[bi, d0 + w, ni] = state[ni, w]


@numba.njit(parallel=True, cache=True, fastmath=True)
def _scan_chunk_backward(
    decay: npt.NDArray[np.float32],  # (b, T, d, n)
    u: npt.NDArray[np.float32],  # (b, T, d)
    delta: npt.NDArray[np.float32],  # (b, T, d)
    A: npt.NDArray[np.float32],  # (d, n)
    B: npt.NDArray[np.float32],  # (b, T, n)
    C: npt.NDArray[np.float32],  # (b, T, n)
    D: npt.NDArray[np.float32],  # (d,)
    h_start: npt.NDArray[np.float32],  # (b, d, n): state before the chunk
    dy: npt.NDArray[np.float32],  # (b, T, d)
    dh: npt.NDArray[np.float32],  # (b, d, n): gradient after the chunk in, before it out
    slots: npt.NDArray[np.int64],  # (b, T): the slot written after each step, or -1
    dcap: npt.NDArray[np.float32],  # (b, slots, d, n): gradients of the captured states
    du: npt.NDArray[np.float32],  # (b, T, d), written
    ddelta: npt.NDArray[np.float32],  # (b, T, d), written
    dA_part: npt.NDArray[np.float32],  # (b, d, n), accumulated
    dB_part: npt.NDArray[np.float32],  # (b, G, T, n), accumulated per channel group
    dC_part: npt.NDArray[np.float32],  # (b, G, T, n), accumulated per channel group
    dD_part: npt.NDArray[np.float32],  # (b, d), accumulated
) -> None:
    nb, steps, nd, nn = decay.shape
    groups = dB_part.shape[1]
    per = (nd + groups - 1) // groups
    for job in numba.prange(nb * groups):
        bi = job // groups
        gi = job % groups
        states = np.empty((steps, nn), np.float32)  # one channel's chunk, reused: in cache
        h = np.empty(nn, np.float32)
        g = np.empty(nn, np.float32)
        for di in range(gi * per, min(nd, (gi + 1) * per)):
            h[:] = h_start[bi, di]
            for t in range(steps):  # recompute the chunk's states from its checkpoint
                drive = delta[bi, t, di] * u[bi, t, di]
                for ni in range(nn):
                    h[ni] = decay[bi, t, di, ni] * h[ni] + drive * B[bi, t, ni]
                    states[t, ni] = h[ni]
            g[:] = dh[bi, di]  # dL/dh_t, carried backwards
            for t in range(steps - 1, -1, -1):
                slot = slots[bi, t]
                if slot >= 0:  # the captured state h_t is read elsewhere: add its gradient
                    for ni in range(nn):
                        g[ni] += dcap[bi, slot, di, ni]
                dyt = dy[bi, t, di]
                ut = u[bi, t, di]
                dl = delta[bi, t, di]
                dD_part[bi, di] += dyt * ut
                du_t = dyt * D[di]
                dl_t = np.float32(0.0)
                for ni in range(nn):
                    g[ni] += dyt * C[bi, t, ni]  # y_t = C_t . h_t + D u_t
                    dC_part[bi, gi, t, ni] += dyt * states[t, ni]
                    previous = states[t - 1, ni] if t > 0 else h_start[bi, di, ni]
                    a = decay[bi, t, di, ni]
                    da = g[ni] * previous  # h_t = a_t h_{t-1} + delta_t u_t B_t
                    dl_t += da * a * A[di, ni] + g[ni] * ut * B[bi, t, ni]
                    dA_part[bi, di, ni] += da * a * dl
                    dB_part[bi, gi, t, ni] += g[ni] * dl * ut
                    du_t += g[ni] * dl * B[bi, t, ni]
                    g[ni] = g[ni] * a
                du[bi, t, di] = du_t
                ddelta[bi, t, di] = dl_t
            dh[bi, di] = g
