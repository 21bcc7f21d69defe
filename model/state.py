"""Recurrent states: picking rows, and bytes for the cache.

A patient's whole history lives in a few hundred kilobytes of state (per block: conv
(d, K-1) and ssm (d, n)), which is what makes incremental scoring constant-cost. The byte
form is a JSON header and raw little-endian float32: no pickle, so a poisoned cache entry
can at worst fail to parse, never run code.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

from model.mamba import LayerState
from model.network import ModelState

_MAGIC = b"EHRMS1"


def pick_captured(captured: ModelState, rows: torch.Tensor, slots: torch.Tensor) -> ModelState:
    """From captured states (b, k, ...), the (row, slot) pairs (m,) as a batch of m."""
    return ModelState(
        tuple(LayerState(s.conv[rows, slots], s.ssm[rows, slots]) for s in captured.layers)
    )


def captured_at(captured: ModelState, row: int, slot: int) -> ModelState:
    """From captured states (b, k, ...), the one of ``row`` at ``slot`` as a batch of 1: a
    copy when b > 1, so a cached cut state does not keep its whole batch's captures alive
    (with one row, what a view keeps is that row's own few slots)."""

    def take(t: torch.Tensor) -> torch.Tensor:
        part = t[row, slot : slot + 1]
        return part.clone() if t.shape[0] > 1 else part

    return ModelState(tuple(LayerState(take(s.conv), take(s.ssm)) for s in captured.layers))


def concat(states: list[ModelState]) -> ModelState:
    """Stack batches of states along the batch dimension (one batch is returned as is)."""
    if len(states) == 1:
        return states[0]
    layers = zip(*(s.layers for s in states), strict=True)
    return ModelState(
        tuple(
            LayerState(torch.cat([p.conv for p in per]), torch.cat([p.ssm for p in per]))
            for per in layers
        )
    )


def to_bytes(state: ModelState) -> bytes:
    """One patient's state (batch of 1) as bytes."""
    if state.layers[0].ssm.shape[0] != 1:
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
    arrays: list[torch.Tensor] = []
    for shape in shapes:
        count = int(np.prod(shape))
        chunk = data[offset : offset + 4 * count]
        if len(chunk) != 4 * count:
            raise ValueError("truncated model state")
        arrays.append(torch.from_numpy(np.frombuffer(chunk, dtype="<f4").reshape(shape).copy()))
        offset += 4 * count
    if offset != len(data) or len(arrays) % 2:
        raise ValueError("model state has trailing or missing bytes")
    return ModelState(
        tuple(
            LayerState(arrays[i].unsqueeze(0), arrays[i + 1].unsqueeze(0))
            for i in range(0, len(arrays), 2)
        )
    )
