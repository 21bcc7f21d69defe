"""Token sequences (numpy, from the tokenizer) to padded model batches (torch).

Padding goes on the right with id 0 everywhere (``[PAD]``, type PAD). Right padding never
reaches a state that is used: the engine captures each row's states at its own positions,
and training masks padded positions out of every loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fhir_adapter.tokenizer import TokenSequence
from model.network import STREAMS, TokenBatch


def collate(sequences: Sequence[TokenSequence]) -> tuple[TokenBatch, torch.Tensor]:
    """A right-padded batch (b, l) and the true lengths (b,)."""
    if not sequences:
        raise ValueError("an empty batch")
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    columns: dict[str, torch.Tensor] = {}
    for name in STREAMS:
        first = getattr(sequences[0], name)
        dtype = np.float32 if first.dtype.kind == "f" else np.int64
        block = np.zeros((len(sequences), width), dtype=dtype)
        for row, seq in enumerate(sequences):
            block[row, : len(seq)] = getattr(seq, name)
        columns[name] = torch.from_numpy(block)
    return TokenBatch(**columns), torch.tensor(lengths, dtype=torch.int64)
