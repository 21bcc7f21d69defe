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
        par = parent.cpu().numpy().astype(np.int64)
        check_parents(par)
        b, length = par.shape
        steps = np.arange(length)
        windows = np.empty((b, length, kernel), dtype=np.int64)
        current = np.broadcast_to(steps, (b, length)).copy()
        windows[:, :, kernel - 1] = current
        for k in range(kernel - 2, -1, -1):
            # Before the row come the start state's saved inputs, a plain chain: -1, -2, ...
            before = np.take_along_axis(par, current.clip(min=0), axis=1)
            current = np.where(current >= 0, before, current - 1)
            windows[:, :, k] = current
        windows += kernel - 1  # positions -> conv_in indices
        plain = steps[:, None] + np.arange(kernel)  # (l, K)
        rows, positions = np.nonzero((windows != plain).any(axis=-1))
        return cls(
            parent=torch.from_numpy(par),
            windows=torch.from_numpy(windows),
            rows=torch.from_numpy(rows),
            positions=torch.from_numpy(positions),
            off_windows=torch.from_numpy(windows[rows, positions]),
        )


def check_parents(parent: npt.NDArray[np.int64]) -> None:
    """Raise ValueError unless every token's parent (b, l) is an earlier position or -1."""
    steps = np.arange(parent.shape[1])
    if ((parent >= steps) | (parent < -1)).any():
        raise ValueError("a token's parent must be an earlier position, or -1 (the start)")
