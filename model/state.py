"""Recurrent states: the stacked form every path takes and gives, picking rows, and
bytes for the cache.

A patient's whole history lives in a few hundred kilobytes of state (per block: conv
(d, K-1) and ssm (d, n)), which is what makes incremental scoring constant-cost. The byte
form is a JSON header and raw little-endian float32: no pickle, so a poisoned cache entry
can at worst fail to parse, never run code.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from model.config import ModelConfig
from model.mamba import LayerState

_MAGIC = b"EHRMS1"


@dataclass(frozen=True)
class ModelState:
    """The recurrent state of every block, stacked over the L blocks: conv (L, b, d, K-1),
    each block's last K-1 conv inputs, and ssm (L, b, d, n). Captured states add a slot
    axis after b: (L, b, k, d, K-1) and (L, b, k, d, n). What the engine caches per
    patient.

    Two stacked tensors rather than one pair per block: a forward of a few tokens
    (``model.packed``) takes and gives the whole state as they are, and picking, joining
    or serialising states is one operation on each instead of one per block. A few-token
    forward is bound by such small operations (docs/benchmarks.md)."""

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def of(cls, layers: Sequence[LayerState]) -> ModelState:
        """The blocks' states stacked (a copy)."""
        return cls(torch.stack([s.conv for s in layers]), torch.stack([s.ssm for s in layers]))

    @classmethod
    def empty(
        cls, config: ModelConfig, batch: int, device: torch.device | None = None
    ) -> ModelState:
        """The state before any token: zeros."""
        layers, d = config.num_hidden_layers, config.intermediate_size
        return cls(
            torch.zeros(layers, batch, d, config.conv_kernel - 1, device=device),
            torch.zeros(layers, batch, d, config.state_size, device=device),
        )

    @property
    def layers(self) -> tuple[LayerState, ...]:
        """Each block's state, as views."""
        return tuple(LayerState(c, s) for c, s in zip(self.conv, self.ssm, strict=True))


def pick_captured(captured: ModelState, rows: torch.Tensor, slots: torch.Tensor) -> ModelState:
    """From captured states (L, b, k, ...), the (row, slot) pairs (m,) as a batch of m."""
    return ModelState(captured.conv[:, rows, slots], captured.ssm[:, rows, slots])


def captured_at(captured: ModelState, row: int, slot: int) -> ModelState:
    """From captured states (L, b, k, ...), the one of ``row`` at ``slot`` as a batch of 1:
    a copy when b > 1, so a cached cut state does not keep its whole batch's captures alive
    (with one row, what a view keeps is that row's own few slots)."""

    def take(t: torch.Tensor) -> torch.Tensor:
        part = t[:, row, slot : slot + 1]
        return part.clone() if t.shape[1] > 1 else part

    return ModelState(take(captured.conv), take(captured.ssm))


def concat(states: list[ModelState]) -> ModelState:
    """Join batches of states along the batch dimension (one batch is returned as is)."""
    if len(states) == 1:
        return states[0]
    return ModelState(
        torch.cat([s.conv for s in states], dim=1), torch.cat([s.ssm for s in states], dim=1)
    )


def to_bytes(state: ModelState) -> bytes:
    """One patient's state (batch of 1) as bytes: each block's conv, then its ssm."""
    if state.ssm.shape[1] != 1:
        raise ValueError("serialise one patient's state at a time")
    arrays = [a for s in state.layers for a in (s.conv[0], s.ssm[0])]
    header = json.dumps({"shapes": [list(a.shape) for a in arrays]}).encode()
    body = b"".join(a.detach().float().contiguous().numpy().astype("<f4").tobytes()
                    for a in arrays)  # fmt: skip
    return _MAGIC + struct.pack("<I", len(header)) + header + body


def from_bytes(data: bytes) -> ModelState:
    """Inverse of ``to_bytes``; ValueError on anything malformed."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise ValueError("not a serialised model state")
    offset = len(_MAGIC)
    (size,) = struct.unpack_from("<I", data, offset)
    offset += 4
    try:
        shapes = json.loads(data[offset : offset + size])["shapes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError("corrupt model state header") from exc
    offset += size
    arrays: list[npt.NDArray[np.float32]] = []  # views of ``data``; stacking copies once
    for shape in shapes:
        if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
            raise ValueError("corrupt model state header")
        count = int(np.prod(shape))
        if offset + 4 * count > len(data):
            raise ValueError("truncated model state")
        arrays.append(np.frombuffer(data, "<f4", count, offset).reshape(shape))
        offset += 4 * count
    if offset != len(data) or not arrays or len(arrays) % 2:
        raise ValueError("model state has trailing or missing bytes")
    convs, ssms = arrays[0::2], arrays[1::2]
    if len({a.shape for a in convs}) > 1 or len({a.shape for a in ssms}) > 1:
        raise ValueError("model state blocks differ in shape")
    conv, ssm = (torch.from_numpy(np.stack(part)).unsqueeze(1) for part in (convs, ssms))
    return ModelState(conv, ssm)
