"""What every block of one forward needs to know about its rows, worked out once.

Shape letters: b batch, l row length, k captured positions per row, K conv kernel width.

A forward may ask for the state after chosen positions (``capture``, the cut points the
engine caches and training branches from) and may scan token trees (``parent``, see
``model.branches``). Each of the blocks needs the same facts about both: which conv
inputs form each captured conv state, where the compiled scan keeps the captured SSM
states (``SlotPlan``), which path each token follows. Working them out once per forward
instead of once per block matters for an incremental update, whose cost is a few hundred
small operations, not arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.branches import Branches
from model.scan import SlotPlan


@dataclass(frozen=True)
class Route:
    """One forward's captures and trees.

    capture (b, k): positions whose state to return, -1 for none; branches: the token
    trees, or None for plain rows; plan: where the compiled scan keeps captured states;
    windows (b, k, K-1): ``conv_in`` rows of each captured conv state (oldest first);
    end (b, K-1): ``conv_in`` rows of the end conv state, None when it is simply the last
    K-1 inputs (plain rows).
    """

    capture: torch.Tensor | None
    branches: Branches | None
    plan: SlotPlan | None
    windows: torch.Tensor | None
    end: torch.Tensor | None

    @classmethod
    def of(
        cls, capture: torch.Tensor | None, parent: torch.Tensor | None, b: int, length: int,
        kernel: int,
    ) -> Route | None:  # fmt: skip
        """None when there is nothing to capture and no tree (every block's plain path).

        Raises ValueError when a token's parent is not an earlier position or -1."""
        if capture is None and parent is None:
            return None
        branches = Branches.of(parent, kernel) if parent is not None else None
        plan = SlotPlan.of(capture, parent, b, length)
        windows = _window_rows(capture, branches, kernel) if capture is not None else None
        end = None
        if branches is not None:  # the last token's path, not necessarily the last inputs
            last = torch.full((b, 1), length - 1, dtype=torch.int64)
            end = _window_rows(last, branches, kernel)[:, 0]
        return cls(capture, branches, plan, windows, end)

    def captured_conv(self, conv_in: torch.Tensor) -> torch.Tensor:
        """conv_in (b, K-1+l, d) -> the conv state after each captured position
        (b, k, d, K-1), zeros where the position is -1."""
        assert self.capture is not None
        assert self.windows is not None
        b, k = self.capture.shape
        rows = torch.arange(b, device=conv_in.device).view(b, 1, 1)
        windows = conv_in[rows, self.windows.to(conv_in.device)]  # (b, k, K-1, d)
        asked = (self.capture >= 0).to(conv_in.device).view(b, k, 1, 1)
        return windows.transpose(2, 3) * asked

    def end_conv(self, conv_in: torch.Tensor) -> torch.Tensor:
        """conv_in (b, K-1+l, d) -> the conv state after each tree row's last token
        (b, d, K-1). Only for trees: a plain row's is its last K-1 inputs."""
        assert self.end is not None
        rows = torch.arange(conv_in.shape[0], device=conv_in.device).view(-1, 1)
        return conv_in[rows, self.end.to(conv_in.device)].transpose(1, 2)


def _window_rows(capture: torch.Tensor, branches: Branches | None, kernel: int) -> torch.Tensor:
    """capture (b, k) -> the ``conv_in`` rows of the K-1 inputs ending at each position
    (b, k, K-1): along a plain row, t+1 .. t+K-1 (conv_in starts with the K-1 saved
    inputs); in a tree, the position's own path (``Branches.windows``). -1 reads row 0."""
    positions = capture.cpu().clamp(min=0)
    if branches is None:
        return positions.unsqueeze(-1) + torch.arange(1, kernel)
    rows = torch.arange(capture.shape[0]).view(-1, 1)
    return branches.windows[rows, positions, 1:]
