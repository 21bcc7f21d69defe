"""Integrated gradients (IG): which tokens, events and codes moved a task's probability.

Shape letters:
    l  input length: the window, the closing tokens the engine appends, the task token
    h  hidden size          m  integration steps          a  steps run in one batch

The explained function is the engine's own: F(x) = sigmoid(the task's column of the
clinical head at the task token), where x (l, h) is ``EHRMamba.input_embeddings`` of
exactly the input the engine scores (the model's window of the record, ``[VE] [REG]`` when
the current visit is open and the task reads a closed one, then the task token; for length
of stay the window up to the 24 h cut, then ``[LOS]``). That is the tensor
``transformers.MambaModel`` would take as ``inputs_embeds``: every stream (code, time, age,
type, segment, visit order) is already
folded into it, so one attribution per token covers all of them.

IG (Sundararajan et al., 2017) from a baseline x', per token i summed over h:

    IG_i = sum_h (x_i - x'_i) * integral_0^1 dF(x' + alpha (x - x')) / dx_i  d alpha
         ~ sum_h (x_i - x'_i) * sum_j w_j dF(x' + alpha_j (x - x')) / dx_i

with Gauss-Legendre nodes alpha_j and weights w_j on [0, 1] (exact for polynomials of
degree 2m - 1, so far fewer steps than a Riemann sum for the same error). Completeness:
sum_i IG_i = F(x) - F(x') for the exact integral; the gap left is the quadrature error,
reported with every explanation.

The quadrature is the one Captum's ``IntegratedGradients(method="gausslegendre")`` uses, and
tests/model/test_explain.py checks that both give the same attributions (to 1e-6) for the
same function and baseline. It is written out here (twenty lines) rather than imported so the
served path does not carry a research toolkit and its plotting dependencies, and so the
steps per backward pass follow a token budget rather than a fixed batch size.

Baseline: every position holds the embedding of ``[PAD]`` (every stream 0, the vector the
model reads on padding: no code, no time, no visit), except the task token, which keeps its
own embedding. So the question asked is the task's, and only the patient's tokens (and the
closing tokens the engine adds) are attributed; the task token's attribution is 0 by
construction (x_i = x'_i) and it is not listed. Zeros were rejected by measurement: the
first block's RMSNorm blows a near-zero input up, so F jumps within the first few percent
of the path (0.07 to 0.94 on a long record) and no affordable quadrature follows it; from
``[PAD]`` F rises smoothly. Tokens outside the window (truncated away) or after the
length-of-stay cut are not in x at all: they are listed as not seen, with 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from fhir_adapter.tokenizer import (
    EVENT_TYPES,
    TokenSequence,
    close_visit,
    kept_positions,
    truncate,
    with_task_token,
)
from fhir_adapter.vocabulary import TokenType, Vocabulary
from model.batching import collate
from model.network import EHRMamba, TokenBatch
from model.tasks import Task

DEFAULT_STEPS = 32  # chosen by measurement: docs/benchmarks.md, "Explanations"
DEFAULT_BATCH_TOKENS = 2048  # steps x input length in one backward pass: measured there too
_EVENT_KINDS = frozenset(EVENT_TYPES.values())


@dataclass(frozen=True)
class TokenAttribution:
    """One token of the record (``record_position`` set) or one the engine appended to
    close the open visit (``record_position`` None). ``input_position`` is where the model
    read it; None means the model did not see it, and its attribution is 0."""

    token: str
    kind: TokenType
    time: datetime
    visit_order: int
    record_position: int | None
    input_position: int | None
    attribution: float

    @property
    def seen(self) -> bool:
        return self.input_position is not None


@dataclass(frozen=True)
class EventAttribution:
    """One clinical event: the tokens of one code at one time in one visit (the tokenizer
    writes one token per timeline event, so repeats are the same result recorded twice).
    ``tokens`` index ``Explanation.tokens``."""

    token: str
    time: datetime
    visit_order: int
    tokens: tuple[int, ...]
    attribution: float
    seen: bool

    @property
    def code(self) -> str:
        """The code without its lab bin (``LOINC|2345-7#3`` -> ``LOINC|2345-7``)."""
        return self.token.split("#", 1)[0]


@dataclass(frozen=True)
class ConceptAttribution:
    """A code's total over its events (lab bins together: the concept, not the value)."""

    code: str
    events: int
    attribution: float


@dataclass(frozen=True)
class Explanation:
    """Attributions of ``probability - baseline_probability`` to the input.

    ``tokens``: the record in order, then the appended closing tokens. ``events`` in record
    order; ``concepts`` by attribution, largest first. ``completeness_gap`` is
    sum(attributions) - (probability - baseline_probability): the integration error.
    """

    task: Task
    probability: float
    baseline_probability: float
    completeness_gap: float
    steps: int
    tokens: tuple[TokenAttribution, ...]
    events: tuple[EventAttribution, ...]
    concepts: tuple[ConceptAttribution, ...]

    @property
    def structure(self) -> float:
        """What the non-event tokens carry: ``[CLS]``, visit boundaries, intervals."""
        return sum(t.attribution for t in self.tokens if t.kind not in _EVENT_KINDS)


class Explainer:
    """Explains one model's task probabilities over the same input its engine scores.

    ``max_length`` is the model's window (``ServingConfig.max_length``); records are passed
    whole, so the tokens the window drops can be reported as not seen.
    """

    def __init__(self, model: EHRMamba, vocab: Vocabulary, max_length: int | None) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.max_length = max_length

    def explain(
        self,
        record: TokenSequence,
        task: Task,
        *,
        los_cut: int | None = None,
        steps: int = DEFAULT_STEPS,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> Explanation:
        """IG of ``task``'s probability for ``record`` (the whole tokenized record, no window).

        ``los_cut`` (length of stay only, required there) is ``PatientInput.los_cut``: a
        prefix length of the window ``truncate(record, max_length)``. ``batch_tokens``
        bounds the tokens in one backward pass (a steps * l budget: activations for the
        backward are what take memory).
        """
        if len(record) == 0:
            raise ValueError("cannot explain an empty sequence")
        if steps < 1:
            raise ValueError("steps must be at least 1")
        window, record_at = self._window(record)
        if task is Task.LENGTH_OF_STAY:
            if los_cut is None or not 0 < los_cut <= len(window):
                raise ValueError("length of stay needs a cut inside the window (los_cut)")
            scored = window.prefix(los_cut)
        else:
            scored = close_visit(window, self.vocab)
        batch, _ = collate([with_task_token(scored, self.vocab.id(task.token))])
        with torch.no_grad():
            x = self.model.input_embeddings(batch)[0]  # (l, h)
            baseline = self._baseline(x)
            p, p0 = _probability(self.model, task, torch.stack([x, baseline])).tolist()
        per_token = _integrated_gradients(
            self.model, task, x, baseline, steps, max(1, batch_tokens // x.shape[0])
        )
        tokens = self._tokens(record, scored, record_at, per_token.tolist())
        total = sum(t.attribution for t in tokens)
        events = _events(tokens)
        return Explanation(
            task=task,
            probability=p,
            baseline_probability=p0,
            completeness_gap=total - (p - p0),
            steps=steps,
            tokens=tokens,
            events=events,
            concepts=_concepts(events),
        )

    def _window(self, record: TokenSequence) -> tuple[TokenSequence, list[int]]:
        """The model's window of the record and, per window position, its record position
        (a truncated window starts with copies of ``[CLS]`` and maybe ``[VS]``)."""
        kept = kept_positions(record, self.max_length) if self.max_length else None
        if kept is None:
            return record, list(range(len(record)))
        assert self.max_length is not None
        return truncate(record, self.max_length), [int(i) for i in kept]

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        """x' (l, h): the ``[PAD]`` embedding everywhere but the task token (the last)."""
        zeros = torch.zeros(1, 1, dtype=torch.int64)
        pad = TokenBatch(zeros, zeros, zeros.float(), zeros.float(), zeros, zeros)
        baseline = self.model.input_embeddings(pad)[0].expand_as(x).clone()
        baseline[-1] = x[-1]
        return baseline

    def _tokens(
        self,
        record: TokenSequence,
        scored: TokenSequence,
        record_at: list[int],
        per_token: list[float],
    ) -> tuple[TokenAttribution, ...]:
        """Record tokens with the attribution of the input position that read them (0 and
        not seen for the others), then the appended closing tokens."""
        n_window = min(len(scored), len(record_at))
        read_at = {record_at[i]: i for i in range(n_window)}
        out = [
            _token(self.vocab, record, i, i, read_at.get(i), per_token) for i in range(len(record))
        ]
        out += [
            _token(self.vocab, scored, i, None, i, per_token)
            for i in range(len(record_at), len(scored))
        ]
        return tuple(out)


def _probability(model: EHRMamba, task: Task, x: torch.Tensor) -> torch.Tensor:
    """The network from its input embeddings on: blocks, final norm, the task's column of
    the clinical head at the last position (the task token). x (a, l, h) -> (a,). In grad
    mode the blocks run the compiled scan with its compiled backward
    (``model.scan.compiled_scan``)."""
    for block in model.backbone.blocks():
        x, _, _ = block(x)
    hidden = model.backbone.norm_f(x)
    columns = torch.full((x.shape[0],), task.column)
    return torch.sigmoid(model.task_logit(hidden[:, -1], columns))


def _integrated_gradients(
    model: EHRMamba, task: Task, x: torch.Tensor, baseline: torch.Tensor, steps: int, per_batch: int
) -> torch.Tensor:
    """IG_i (l,) for x, x' (l, h) with ``steps`` Gauss-Legendre nodes, ``per_batch`` at once.

    Nodes on [-1, 1] map to alpha = (t + 1) / 2 on [0, 1], weights halve:
        integral_0^1 g(alpha) d alpha ~ sum_j (w_j / 2) g((t_j + 1) / 2)
    Only the input's gradient is asked for (``torch.autograd.grad`` with ``inputs``), so no
    weight gradient is computed.
    """
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor((nodes + 1) / 2, dtype=x.dtype)  # (m,)
    scale = torch.tensor(weights / 2, dtype=x.dtype)  # (m,)
    delta = x - baseline  # (l, h)
    mean_gradient = torch.zeros_like(x)  # sum_j w_j dF/dx at alpha_j, (l, h)
    for start in range(0, steps, per_batch):
        alpha = alphas[start : start + per_batch].view(-1, 1, 1)  # (a, 1, 1)
        path = (baseline + alpha * delta).requires_grad_(True)  # (a, l, h)
        with torch.enable_grad():
            probabilities = _probability(model, task, path)  # (a,)
            (gradient,) = torch.autograd.grad(probabilities.sum(), path)  # (a, l, h)
        w = scale[start : start + per_batch].view(-1, 1, 1)
        mean_gradient += (w * gradient).sum(0)
    return (delta * mean_gradient).sum(-1)  # (l,)


def _token(
    vocab: Vocabulary,
    seq: TokenSequence,
    i: int,
    record_position: int | None,
    input_position: int | None,
    per_token: list[float],
) -> TokenAttribution:
    return TokenAttribution(
        token=vocab.token(int(seq.concept[i])),
        kind=TokenType(int(seq.type[i])),
        time=datetime.fromtimestamp(int(seq.timestamp[i]), UTC),
        visit_order=int(seq.visit_order[i]),
        record_position=record_position,
        input_position=input_position,
        attribution=per_token[input_position] if input_position is not None else 0.0,
    )


def _events(tokens: tuple[TokenAttribution, ...]) -> tuple[EventAttribution, ...]:
    """Event tokens grouped by (visit, time, code token), in record order."""
    groups: dict[tuple[int, datetime, str], list[int]] = defaultdict(list)
    for i, t in enumerate(tokens):
        if t.kind in _EVENT_KINDS and t.record_position is not None:
            groups[(t.visit_order, t.time, t.token)].append(i)
    return tuple(
        EventAttribution(
            token=token,
            time=time,
            visit_order=visit,
            tokens=tuple(members),
            attribution=sum(tokens[i].attribution for i in members),
            seen=any(tokens[i].seen for i in members),
        )
        for (visit, time, token), members in groups.items()
    )


def _concepts(events: tuple[EventAttribution, ...]) -> tuple[ConceptAttribution, ...]:
    totals: dict[str, list[float]] = defaultdict(list)
    for event in events:
        totals[event.code].append(event.attribution)
    ranked = sorted(totals.items(), key=lambda item: (-sum(item[1]), item[0]))
    return tuple(ConceptAttribution(code, len(values), sum(values)) for code, values in ranked)
