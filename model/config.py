"""Model configuration: one dataclass, two named sizes.

``compact`` is sized for CPU serving (a few million parameters); ``paper`` is the EHRMamba
paper's size (768 wide, 32 blocks, state 16, conv 4) for GPUs. Same code, different numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Names of the Mamba fields follow ``transformers.MambaConfig``."""

    vocab_size: int
    hidden_size: int = 256
    num_hidden_layers: int = 8
    state_size: int = 16
    conv_kernel: int = 4
    expand: int = 2
    time_step_rank: int = 0  # 0 means ceil(hidden_size / 16), as in Mamba
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    time_embedding_size: int = 32  # per stream (time, age), Time2Vec
    n_token_types: int = 10
    n_segments: int = 3
    max_visit_order: int = 512
    dropout: float = 0.1

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        return self.time_step_rank or math.ceil(self.hidden_size / 16)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelConfig:
        return cls(**doc)


SIZES: dict[str, dict[str, int]] = {
    "compact": {"hidden_size": 256, "num_hidden_layers": 8},
    "paper": {"hidden_size": 768, "num_hidden_layers": 32},
}


def sized(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """A named size (``compact`` or ``paper``) for a vocabulary."""
    if name not in SIZES:
        raise ValueError(f"unknown size {name!r}; choose from {sorted(SIZES)}")
    return ModelConfig(vocab_size=vocab_size, **{**SIZES[name], **overrides})
