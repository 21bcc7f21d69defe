"""Synthetic model inputs for benchmarks: timing does not depend on the values."""

from __future__ import annotations

import torch

from model.network import TokenBatch

FIRST_CODE_ID = 29  # ids below are special, interval and task tokens


def synthetic_batch(
    batch: int, tokens: int, vocab_size: int, device: torch.device | None = None
) -> TokenBatch:
    """(batch, tokens) of random code tokens in one long visit, on ``device``."""
    g = torch.Generator().manual_seed(tokens)
    ones = torch.ones(batch, tokens, dtype=torch.int64)
    fields = TokenBatch(
        concept=torch.randint(FIRST_CODE_ID, vocab_size, (batch, tokens), generator=g),
        type=torch.randint(0, 10, (batch, tokens), generator=g),
        age=torch.full((batch, tokens), 64.0),
        time=2800 + torch.arange(tokens, dtype=torch.float32).repeat(batch, 1) / 100,
        segment=ones,
        visit_order=ones,
    )
    return TokenBatch(*(getattr(fields, f).to(device) for f in TokenBatch.__dataclass_fields__))
