"""EHRMamba: the paper's embeddings, a Mamba backbone, a forecasting head and a clinical
head read at the task token, with one output column per task.

Shape letters: b batch, l sequence length, h hidden size, v vocabulary size,
k captured positions per sequence, e Time2Vec size, t tasks.

Embeddings (paper section 2.2, appendix C.2): the concept embedding is concatenated with
learned sinusoidal (Time2Vec) embeddings of time and age and projected back to h; token-type,
visit-segment and visit-order embeddings are added. No positional embedding: the recurrence
orders the sequence.

``backbone`` holds exactly the parameters of ``transformers.MambaModel`` (``embeddings`` for
concepts, ``layers``, ``norm_f``), so its state dict loads into that class and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from model import packed
from model.config import ModelConfig
from model.mamba import LayerState, MambaBlock, RMSNorm
from model.route import Route
from model.state import ModelState
from model.tasks import Task

WEEKS_PER_YEAR = 52.1775


@dataclass(frozen=True)
class TokenBatch:
    """Model inputs, each (b, l): concept/type/segment/visit_order int64, age/time float32
    (age in years; time in weeks since 1970, as the tokenizer writes them)."""

    concept: torch.Tensor
    type: torch.Tensor
    age: torch.Tensor
    time: torch.Tensor
    segment: torch.Tensor
    visit_order: torch.Tensor


STREAMS = ("concept", "type", "age", "time", "segment", "visit_order")  # TokenBatch's fields


class Time2Vec(nn.Module):
    """A scalar to e features: one linear, e-1 sinusoids with learned frequency and phase."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.periodic = nn.Linear(1, size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, l) -> (b, l, e)"""
        x = x.unsqueeze(-1)
        features: torch.Tensor = torch.cat([self.linear(x), torch.sin(self.periodic(x))], dim=-1)
        return features


class Embeddings(nn.Module):
    """Everything but the concept table (which lives in the backbone, by its HF name)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, e = config.hidden_size, config.time_embedding_size
        self.time = Time2Vec(e)
        self.age = Time2Vec(e)
        self.project = nn.Linear(h + 2 * e, h)
        self.token_type = nn.Embedding(config.n_token_types, h)
        self.segment = nn.Embedding(config.n_segments, h)
        self.visit_order = nn.Embedding(config.max_visit_order + 1, h)
        self.max_visit_order = config.max_visit_order
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, concepts: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """concepts (b, l, h) from the concept table -> input embeddings (b, l, h)"""
        years = batch.time / WEEKS_PER_YEAR
        x = self.project(torch.cat([concepts, self.time(years), self.age(batch.age)], dim=-1))
        x = x + self.token_type(batch.type) + self.segment(batch.segment)
        x = x + self.visit_order(batch.visit_order.clamp(max=self.max_visit_order))
        out: torch.Tensor = self.dropout(x)
        return out


class Backbone(nn.Module):
    """Concept embeddings, Mamba blocks, final norm: ``MambaModel``'s parameters exactly."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def blocks(self) -> list[MambaBlock]:
        """The layers, typed."""
        return [cast(MambaBlock, block) for block in self.layers]


class EHRMamba(nn.Module):
    """Scores tasks at their task tokens and forecasts the next token, from one recurrence."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # One output column per task, read at that task's token: the task token tells the
        # scan what to look for, the column gives each task its own base rate and direction.
        # A single shared column (DESIGN.md 4 as first written) learned one severity score
        # for every task; see docs/results.md.
        self.clinical_head = nn.Sequential(nn.Dropout(config.dropout),
                                           nn.Linear(config.hidden_size, len(Task)))  # fmt: skip
        self._packed_weights: packed.PackedModel | None = None

    def input_embeddings(self, batch: TokenBatch) -> torch.Tensor:
        """(b, l, h): what ``MambaModel`` would receive as ``inputs_embeds``."""
        embedded: torch.Tensor = self.embed(self.backbone.embeddings(batch.concept), batch)
        return embedded

    def forward(
        self,
        batch: TokenBatch,
        state: ModelState | None = None,
        capture: torch.Tensor | None = None,
        parent: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ModelState, ModelState | None]:
        """Hidden states (b, l, h) after the final norm, the end state, captured states.

        Starting from ``state`` continues a sequence scanned earlier (continue-from-state;
        one token is the recurrent step). ``capture`` (b, k): see ``MambaMixer.forward``.
        ``parent`` (b, l) makes each row a token tree (``model.branches``): how the engine
        scores several task tokens, each branching off the same state, in the scan that
        reaches that state.
        """
        if packed.applies(self, batch) and (weights := self._packed()) is not None:
            return weights.forward(batch, state, capture, parent)  # all in one compiled call
        x = self.input_embeddings(batch)
        b, length = batch.concept.shape
        route = Route.of(capture, parent, b, length, self.config.conv_kernel)
        starts = state.layers if state else (None,) * self.config.num_hidden_layers
        ends: list[LayerState] = []
        captured: list[LayerState] = []
        for block, start in zip(self.backbone.blocks(), starts, strict=True):
            x, end, cap = block(x, start, route)
            ends.append(end)
            if cap is not None:
                captured.append(cap)
        hidden = self.backbone.norm_f(x)
        return hidden, ModelState.of(ends), ModelState.of(captured) if captured else None

    def _packed(self) -> packed.PackedModel | None:
        """The weights packed for ``model.packed``, repacked when one has changed; None
        where they are not ``packable`` (another device or dtype)."""
        current = self._packed_weights
        if current is None or not current.unchanged():
            current = packed.PackedModel.of(self) if packed.packable(self) else None
            self._packed_weights = current
        return current

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., h) -> (..., v)"""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits

    def task_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., h) -> (..., t): every task's column; only the column of the task whose token
        produced ``hidden`` means anything."""
        logits: torch.Tensor = self.clinical_head(hidden)
        return logits

    def task_logit(self, hidden: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """hidden (..., h) at task tokens, tasks (...) their ``Task.column`` -> logits (...);
        sigmoid gives the probability."""
        logits = self.task_logits(hidden)
        return logits.gather(-1, tasks.unsqueeze(-1)).squeeze(-1)
