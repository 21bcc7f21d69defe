"""One-pass inference: six tasks and a forecast for the cost of one scan (DESIGN.md 4.1).

For a batch of patients:
1. **Scan** each sequence once (or only its new tokens, continuing from a cached state),
   capturing the state at every cut point a requested task needs: the end of the record,
   and for length of stay the current visit's start + 24 h.
2. **Close** the current visit where it is still open: ``[VE] [REG]`` ride at the end of
   the same scan (the end state is captured before them), because the training inputs of
   mortality, readmission and the conditions end with a closed visit (DESIGN.md 3.3).
   Length of stay reads the open visit as it trained.
3. **Branch**: the task token of every (patient, task) pair, one step from the right state,
   rides in the same scan too: each patient's row is a token tree (``model.branches``)
   whose task tokens branch off the cut points, so scoring adds tokens, not a second call
   of the model. The clinical head gives the probability.
4. **Forecast**: from the end state, k steps of next-event generation (greedy, or top-p
   sampling with a seed), each with its top candidates and their probabilities.

The states a caller should cache come back with the result; given them and a sequence that
extends the cached one, only the new tokens are scanned and the results equal a full
recompute (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fhir_adapter.tokenizer import (
    TokenSequence,
    append_event,
    close_visit,
    concatenate,
    with_task_token,
)
from fhir_adapter.vocabulary import CLS, PAD, TASK_TOKENS, UNK, Vocabulary
from model.batching import collate
from model.network import STREAMS, EHRMamba, TokenBatch
from model.onnx_step import OnnxStep
from model.state import ModelState, captured_at, concat
from model.tasks import Task

_NOT_FORECAST = (PAD, UNK, CLS, *TASK_TOKENS)
_SHORT = 64  # rows this short share a batch whatever their widths (see ``_batches``)


@dataclass(frozen=True)
class CachedScan:
    """What an earlier call scanned: the first ``length`` tokens, the state and last hidden
    vector at that point, and states at earlier cut points (prefix length -> state)."""

    length: int
    end_state: ModelState
    end_hidden: torch.Tensor  # (h,)
    cut_states: dict[int, ModelState] = field(default_factory=dict)


@dataclass(frozen=True)
class PatientInput:
    """One patient's sequence as known now. ``los_cut`` is the prefix length at the current
    visit's start + 24 h (None when there is no current inpatient visit to ask about)."""

    sequence: TokenSequence
    los_cut: int | None = None
    cached: CachedScan | None = None


@dataclass(frozen=True)
class ForecastStep:
    """One forecast event: the token chosen, its probability and the top candidates."""

    token: str
    probability: float
    candidates: tuple[tuple[str, float], ...]

    @property
    def code(self) -> str:
        """The event's code without a lab bin (``LOINC|2345-7#3`` -> ``LOINC|2345-7``)."""
        return self.token.split("#", 1)[0]

    @property
    def lab_bin(self) -> int | None:
        """The forecast lab value bin (0 lowest to 4 highest), None for other tokens."""
        _, sep, bin_ = self.token.partition("#")
        return int(bin_) if sep and bin_.isdigit() else None


@dataclass(frozen=True)
class PatientResult:
    probabilities: dict[Task, float]
    forecast: tuple[ForecastStep, ...]
    cache: CachedScan
    scanned_tokens: int


def extends(old: TokenSequence, new: TokenSequence) -> bool:
    """Whether ``new`` is ``old`` plus tokens at the end (so a cached scan can continue)."""
    return len(new) >= len(old) and new.prefix(len(old)) == old


class Engine:
    """Scores batches of patients with one model and its vocabulary.

    ``onnx_step`` (the model's step exported with ``model.onnx_step.export_step``) runs the
    forecast's single-token steps in onnxruntime instead of PyTorch; the scan, task
    branches included, stays in PyTorch either way.
    """

    def __init__(
        self, model: EHRMamba, vocab: Vocabulary, onnx_step: OnnxStep | None = None
    ) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.onnx_step = onnx_step
        self._task_ids = {task: vocab.id(task.token) for task in Task}
        mask = torch.zeros(len(vocab), dtype=torch.bool)
        mask[[vocab.id(t) for t in _NOT_FORECAST]] = True
        self._not_forecast = mask

    # Inference mode, not just no_grad: no version counters or view tracking on the many
    # small operations of an incremental score, which is bound by per-operation overhead.
    # What it returns (states, hidden vectors) must then never feed a gradient;
    # explanations start from the tokens.
    @torch.inference_mode()
    def score(
        self,
        inputs: Sequence[PatientInput],
        tasks: Sequence[Task],
        *,
        forecast: int = 0,
        top_p: float | None = None,
        seed: int = 0,
        candidates: int = 5,
    ) -> list[PatientResult]:
        """Probabilities for ``tasks`` (length of stay only where ``los_cut`` is set) and a
        ``forecast``-step forecast for every patient."""
        for item in inputs:
            if len(item.sequence) == 0:
                raise ValueError("cannot score an empty sequence")
            if item.los_cut is not None and not 0 < item.los_cut <= len(item.sequence):
                raise ValueError(
                    f"los_cut {item.los_cut} is not a prefix length of the sequence "
                    f"(1 to {len(item.sequence)})"
                )
        scans, probabilities = self._scan(inputs, tasks)
        forecasts = self._forecast(inputs, scans, forecast, top_p, seed, candidates)
        return [
            PatientResult(probabilities[i], forecasts[i], scans[i].cache, scans[i].scanned)
            for i in range(len(inputs))
        ]

    # --- 1 to 3. one scan: new tokens, closing tokens, task-token branches ------------------

    def _scan(
        self, inputs: Sequence[PatientInput], tasks: Sequence[Task]
    ) -> tuple[list[_Scan], list[dict[Task, float]]]:
        """Scan what is new for every patient and score every (patient, task) pair.

        Each patient's row holds the new tokens (with ``[VE] [REG]`` where a task needs the
        open visit closed; the end state is captured before them), then one task token per
        task, each a branch off its cut point's state (a token tree, ``model.branches``).
        A length-of-stay cut that lies inside the cached part branches off the cached state
        in a row of its own. Rows of similar length share one call of the model."""
        needs_close = any(task is not Task.LENGTH_OF_STAY for task in tasks)
        rows: list[_Row] = []
        extra: list[_Row] = []
        for i, item in enumerate(inputs):
            main, own = self._rows(i, item, tasks, needs_close)
            rows.append(main)
            extra += own
        every = [*rows, *extra]
        outputs: list[_RowOutput | None] = [None] * len(every)
        for group in _batches([row.width for row in every]):
            for r, output in zip(group, self._run([every[r] for r in group]), strict=True):
                outputs[r] = output
        probabilities = self._probabilities(every, outputs, len(inputs))
        scans = [
            _cached_scan(item, row, outputs[i])
            for i, (item, row) in enumerate(zip(inputs, rows, strict=True))
        ]
        return scans, probabilities

    def _rows(
        self, patient: int, item: PatientInput, tasks: Sequence[Task], needs_close: bool
    ) -> tuple[_Row, list[_Row]]:
        """The patient's row, and a row of its own for a length-of-stay branch off a cached
        cut state."""
        plan = _plan(item, Task.LENGTH_OF_STAY in tasks)
        seq = item.sequence
        scanned = close_visit(seq, self.vocab) if needs_close else seq
        start = (
            item.cached.end_state
            if plan.start and item.cached is not None
            else ModelState.empty(self.model.config, 1)
        )
        leaves = self._leaves([task for task in tasks if task is not Task.LENGTH_OF_STAY], scanned)
        own: list[_Row] = []
        if plan.los_cut is not None:
            [leaf] = self._leaves([Task.LENGTH_OF_STAY], seq.prefix(plan.los_cut))
            if plan.los_cut >= plan.start:
                leaves.append(leaf)
            else:  # the cut state is in the cache (``_plan`` rescans when it is not)
                assert item.cached is not None
                cut_state = item.cached.cut_states[plan.los_cut]
                own.append(_Row(patient, plan.los_cut, cut_state, seq.prefix(0), (), (leaf,)))
        cuts = tuple(plan.capture_cuts(len(seq), len(scanned)))
        main = _Row(patient, plan.start, start, scanned.suffix(plan.start), cuts, tuple(leaves))
        return main, own

    def _leaves(self, tasks: Sequence[Task], prefix: TokenSequence) -> list[_Leaf]:
        """The task tokens of ``tasks``, each branching off the state after ``prefix`` and
        taking its last token's time and age (appended to that one token, not to the whole
        prefix: an incremental score is bound by small operations)."""
        last = prefix.suffix(len(prefix) - 1)
        return [
            _Leaf(task, len(prefix), with_task_token(last, self._task_ids[task]).suffix(1))
            for task in tasks
        ]

    def _run(self, rows: list[_Row]) -> list[_RowOutput]:
        """The model over ``rows`` as one batch of token trees."""
        batch, _ = collate([row.sequence() for row in rows])
        width = batch.concept.shape[1]
        parent = torch.arange(-1, width - 1).repeat(len(rows), 1)
        capture = torch.full((len(rows), max(len(row.cuts) for row in rows)), -1)
        for r, row in enumerate(rows):
            for j, leaf in enumerate(row.leaves):
                parent[r, len(row.tokens) + j] = leaf.at - row.offset - 1
            for slot, cut in enumerate(row.cuts):
                capture[r, slot] = cut - row.offset - 1
        branching = any(row.leaves for row in rows)
        hidden, _, captured = self.model(
            batch,
            concat([row.start for row in rows]),
            capture if capture.shape[1] else None,
            parent if branching else None,
        )
        outputs: list[_RowOutput] = []
        for r, row in enumerate(rows):
            states: dict[int, ModelState] = {}
            if row.cuts:
                assert captured is not None
                states = {cut: captured_at(captured, r, j) for j, cut in enumerate(row.cuts)}
            outputs.append(_RowOutput(hidden[r, : row.width], states))
        return outputs

    def _probabilities(
        self, rows: list[_Row], outputs: list[_RowOutput | None], patients: int
    ) -> list[dict[Task, float]]:
        """Every task token's probability, through the clinical head in one call."""
        hidden: list[torch.Tensor] = []
        pairs: list[tuple[int, Task]] = []
        for row, output in zip(rows, outputs, strict=True):
            if output is None:
                continue
            for j, leaf in enumerate(row.leaves):
                hidden.append(output.hidden[len(row.tokens) + j])
                pairs.append((row.patient, leaf.task))
        results: list[dict[Task, float]] = [{} for _ in range(patients)]
        if not pairs:
            return results
        columns = torch.tensor([task.column for _, task in pairs])
        logits = self.model.task_logit(torch.stack(hidden), columns)
        for (i, task), p in zip(pairs, torch.sigmoid(logits).tolist(), strict=True):
            results[i][task] = float(p)
        return results

    # --- 4. forecast ------------------------------------------------------------------------

    def _forecast(
        self,
        inputs: Sequence[PatientInput],
        scans: list[_Scan],
        steps: int,
        top_p: float | None,
        seed: int,
        candidates: int,
    ) -> list[tuple[ForecastStep, ...]]:
        out: list[list[ForecastStep]] = [[] for _ in inputs]
        if steps <= 0:
            return [tuple(f) for f in out]
        generator = torch.Generator().manual_seed(seed)
        state = concat([s.cache.end_state for s in scans])
        hidden = torch.stack([s.cache.end_hidden for s in scans])  # (b, h)
        # Each step feeds back one token, which takes the time and age of the one before.
        last = [item.sequence.suffix(len(item.sequence) - 1) for item in inputs]
        for step in range(steps):
            logits = self.model.next_token_logits(hidden).masked_fill(self._not_forecast, -1e9)
            probs = torch.softmax(logits, dim=-1)  # (b, v)
            chosen = _choose(probs, top_p, generator)
            top = torch.topk(probs, k=min(candidates, probs.shape[1]), dim=-1)
            for i in range(len(inputs)):
                token_id = int(chosen[i])
                out[i].append(
                    ForecastStep(
                        token=self.vocab.token(token_id),
                        probability=float(probs[i, token_id]),
                        candidates=tuple(
                            (self.vocab.token(int(t)), float(p))
                            for t, p in zip(top.indices[i], top.values[i], strict=True)
                        ),
                    )
                )
            if step == steps - 1:
                break  # the last choice is made; stepping past it would be wasted
            last = [
                append_event(seq, int(chosen[i]), self.vocab.type_of(int(chosen[i]))).suffix(1)
                for i, seq in enumerate(last)
            ]
            batch, _ = collate(last)
            hidden, state = self._step(batch, state)
        return [tuple(f) for f in out]

    def _step(self, batch: TokenBatch, state: ModelState) -> tuple[torch.Tensor, ModelState]:
        """One token per row (b, 1) from ``state``: hidden (b, h) and the new state, through
        onnxruntime when the engine has an exported step, else PyTorch."""
        if self.onnx_step is None:
            hidden, end, _ = self.model(batch, state)
            return hidden[:, 0], end
        columns = [getattr(batch, name)[:, 0].numpy() for name in STREAMS]
        hidden, _, _, conv, ssm = self.onnx_step.run(
            *columns, state.conv.contiguous().numpy(), state.ssm.contiguous().numpy()
        )
        return torch.from_numpy(hidden), ModelState(torch.from_numpy(conv), torch.from_numpy(ssm))


@dataclass(frozen=True)
class _Plan:
    start: int  # tokens already scanned (from the cache)
    los_cut: int | None

    def capture_cuts(self, length: int, scanned: int) -> list[int]:
        """Prefix lengths whose states this scan must capture (all beyond ``start``): the
        length-of-stay cut, the end of the record, and the end after closing tokens."""
        cuts = [c for c in (self.los_cut, length, scanned) if c is not None and c > self.start]
        return sorted(set(cuts))


@dataclass(frozen=True)
class _Leaf:
    """A task token branching off the state after the first ``at`` tokens."""

    task: Task
    at: int
    token: TokenSequence  # one token, with its prefix's time and age


@dataclass(frozen=True)
class _Row:
    """One row of the scan: ``tokens`` continue ``start``, the state after the first
    ``offset`` tokens; the states at ``cuts`` (prefix lengths) are captured; then each
    leaf's task token branches off its cut."""

    patient: int
    offset: int
    start: ModelState
    tokens: TokenSequence
    cuts: tuple[int, ...]
    leaves: tuple[_Leaf, ...]

    @property
    def width(self) -> int:
        """Tokens in the row: the new ones, then one per leaf."""
        return len(self.tokens) + len(self.leaves)

    def sequence(self) -> TokenSequence:
        """The row's tokens as one sequence, the leaves' task tokens last."""
        return concatenate([self.tokens, *(leaf.token for leaf in self.leaves)])


@dataclass(frozen=True)
class _RowOutput:
    """What the model gave for one row: hidden (width, h), and the states at its cuts."""

    hidden: torch.Tensor
    states: dict[int, ModelState]


@dataclass(frozen=True)
class _Scan:
    cache: CachedScan  # the state and hidden vector at the end of the record, and its cuts
    scanned: int


def _cached_scan(item: PatientInput, row: _Row, output: _RowOutput | None) -> _Scan:
    """The patient's end state, end hidden vector and length-of-stay state, from the cache
    and what its row captured."""
    length = len(item.sequence)
    known: dict[int, ModelState] = {}
    end_hidden: torch.Tensor | None = None
    if item.cached is not None and row.offset:
        known = {**item.cached.cut_states, row.offset: item.cached.end_state}
        end_hidden = item.cached.end_hidden
    if output is not None:
        known.update(output.states)
        if length > row.offset:
            end_hidden = output.hidden[length - row.offset - 1]
    assert end_hidden is not None
    los = item.los_cut
    keep = {los: known[los]} if los is not None and los in known else {}
    return _Scan(CachedScan(length, known[length], end_hidden, keep), length - row.offset)


def _batches(widths: Sequence[int]) -> list[list[int]]:
    """The non-empty rows' indices in batches of similar width.

    Padding a 12-token row to a 2,000-token neighbour would scan 2,000 tokens for it, so a
    batch takes rows up to twice its narrowest row's width; rows of up to ``_SHORT`` tokens
    always share one, where a second call of the model would cost more than the padding."""
    batches: list[list[int]] = []
    for i in sorted((i for i, w in enumerate(widths) if w), key=lambda i: widths[i]):
        if batches and widths[i] <= max(2 * widths[batches[-1][0]], _SHORT):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _plan(item: PatientInput, want_los: bool) -> _Plan:
    """Continue from the cache when it covers every cut point that lies before its end."""
    los_cut = item.los_cut if want_los else None
    cached = item.cached
    if cached is None or cached.length > len(item.sequence) or cached.length == 0:
        return _Plan(0, los_cut)
    if los_cut is not None and los_cut < cached.length and los_cut not in cached.cut_states:
        return _Plan(0, los_cut)
    return _Plan(cached.length, los_cut)


def _choose(probs: torch.Tensor, top_p: float | None, generator: torch.Generator) -> torch.Tensor:
    """Greedy (``top_p`` None) or nucleus sampling with a seeded generator. (b, v) -> (b,)"""
    if top_p is None:
        return probs.argmax(dim=-1)
    ordered, index = torch.sort(probs, dim=-1, descending=True)
    keep = ordered.cumsum(dim=-1) - ordered < top_p  # always keeps the most likely token
    ordered = ordered * keep
    picks = torch.multinomial(ordered / ordered.sum(-1, keepdim=True), 1, generator=generator)
    return index.gather(-1, picks).squeeze(-1)
