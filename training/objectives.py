"""The two training objectives as modules, so ``DistributedDataParallel`` can wrap them and
synchronise gradients when training runs under ``torchrun``.

Shape letters: b batch, l padded length, m prompts in a batch, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.network import EHRMamba, TokenBatch
from model.state import pick_captured
from training.batches import IGNORE, WindowBatch


class NextTokenLoss(nn.Module):
    """Pretraining: mean cross-entropy of each next token; ``IGNORE`` targets (padding, the
    last token) never count."""

    def __init__(self, model: EHRMamba) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: TokenBatch, targets: torch.Tensor) -> torch.Tensor:
        """inputs (b, l), targets (b, l) -> scalar loss."""
        hidden, _, _ = self.model(inputs)
        logits = self.model.next_token_logits(hidden)  # (b, l, v)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


class PromptedLogits(nn.Module):
    """MPF: scan each window once, capturing the state at every prompt's cut, then step
    every prompt's task token from its state in one batch: the engine's branching, with
    gradients. Returns the clinical head's logits (m,)."""

    def __init__(self, model: EHRMamba) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: WindowBatch) -> torch.Tensor:
        _, _, captured = self.model(batch.inputs, capture=batch.capture)
        assert captured is not None
        states = pick_captured(captured, batch.rows, batch.slots)
        hidden, _, _ = self.model(batch.task_tokens, states)  # (m, 1, h)
        return self.model.task_logit(hidden[:, 0], batch.tasks)
