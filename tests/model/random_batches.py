"""Random model inputs for the model tests: any values the model accepts, seeded."""

from __future__ import annotations

import torch

from model.network import TokenBatch

VOCAB = 60


def random_batch(b: int, length: int, seed: int = 0) -> TokenBatch:
    """(b, length) tokens over a vocabulary of ``VOCAB``, with plausible ages and times."""
    g = torch.Generator().manual_seed(seed)
    return TokenBatch(
        concept=torch.randint(0, VOCAB, (b, length), generator=g),
        type=torch.randint(0, 10, (b, length), generator=g),
        age=torch.rand(b, length, generator=g) * 90,
        time=2800 + torch.rand(b, length, generator=g).cumsum(1),
        segment=torch.randint(0, 3, (b, length), generator=g),
        visit_order=torch.randint(0, 30, (b, length), generator=g),
    )
