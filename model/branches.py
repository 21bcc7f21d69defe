"""Token trees: several continuations of one state scanned as one row.

Shape letters: b batch, l row length, K conv kernel width, m tokens off the plain chain.

Scoring six tasks means six task tokens, each a one-step branch off the same state (the
end of the record, or a length-of-stay cut). Scanning them after the new tokens in the same
row, rather than as a second batched call, halves the small operations of an incremental
score, which is bound by their count, not their arithmetic.

A row is a tree when every token names its ``parent``, the position whose state it
continues: ``t - 1`` along a sequence, ``-1`` the row's start state, an earlier position to
branch off it. Each token then sees exactly the tokens on its path back to the start, as if
that path had been scanned alone (tested against separate runs).

Two things depend on the path: the SSM state a step starts from (the scan loads a branch
source's state, see ``model.scan``), and the convolution's window, the K-1 inputs before
the token on its path. ``windows`` lists those as indices into the mixer's ``conv_in`` (the
K-1 inputs saved in the start state, then the row's inputs), so the mixer can gather them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt
import torch


@dataclass(frozen=True)
class Branches:
    """A batch of token trees, with what every block needs to scan them.

    parent (b, l): each token's parent position (see the module docstring).
    windows (b, l, K): each token's conv window as ``conv_in`` indices, oldest first (the
    token itself last); along a plain chain, window t is ``t .. t + K - 1``.
    rows, positions (m,): the tokens whose window is not the plain one, and off_windows
    (m, K) their windows: only these need the gathered convolution.
    """

    parent: torch.Tensor
    windows: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    off_windows: torch.Tensor

    @classmethod
    def of(cls, parent: torch.Tensor, kernel: int) -> Branches:
        """Check ``parent`` (b, l) and work out every token's conv window.

        Raises ValueError when a token's parent is not an earlier position or -1."""
        par = np.ascontiguousarray(parent.cpu().numpy(), dtype=np.int64)
        windows = paths(par, kernel) + (kernel - 1)  # positions -> conv_in indices
        length = par.shape[1]
        plain = np.arange(length)[:, None] + np.arange(kernel)  # (l, K)
        rows, positions = np.nonzero((windows != plain).any(axis=-1))
        return cls(
            parent=torch.from_numpy(par),
            windows=torch.from_numpy(windows),
            rows=torch.from_numpy(rows),
            positions=torch.from_numpy(positions),
            off_windows=torch.from_numpy(windows[rows, positions]),
        )


def paths(parent: npt.NDArray[np.int64], kernel: int) -> npt.NDArray[np.int64]:
    """Each token's conv window along its path (b, l, K), oldest first, the token itself
    last, as positions: p >= 0 a position of the row, p < 0 the start state's saved input
    K-1+p (-1 the newest). Raises ValueError unless every parent (b, l) is an earlier
    position or -1."""
    windows, bad = _paths(parent, kernel)
    if bad:
        raise ValueError("a token's parent must be an earlier position, or -1 (the start)")
    return windows


@numba.njit(cache=True)
def _paths(
    parent: npt.NDArray[np.int64], kernel: int
) -> tuple[npt.NDArray[np.int64], bool]:  # fmt: skip
    """``paths``, and whether some parent is not an earlier position or -1 (then the
    windows are not filled in). One compiled call: the packed forward of an incremental
    score runs this before each kernel call, where every small operation counts."""
    b, length = parent.shape
    windows = np.empty((b, length, kernel), np.int64)
    for i in range(b):
        for t in range(length):
            if parent[i, t] >= t or parent[i, t] < -1:
                return windows, True
    for i in range(b):
        for t in range(length):
            # Walk back along the path; before the row come the start state's saved
            # inputs, a plain chain: -1, -2, ...
            current = t
            windows[i, t, kernel - 1] = current
            for k in range(kernel - 2, -1, -1):
                current = parent[i, current] if current >= 0 else current - 1
                windows[i, t, k] = current
    return windows, False
