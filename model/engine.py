"""One-pass inference: six tasks and a forecast for the cost of one scan (DESIGN.md 4.1).

For a batch of patients:
1. **Scan** each sequence once (or only its new tokens, continuing from a cached state),
   capturing the state at every cut point a requested task needs: the end of the record,
   and for length of stay the current visit's start + 24 h.
2. **Close** the current visit where it is still open: ``[VE] [REG]`` ride at the end of
   the same scan (the end state is captured before them), because the training inputs of
   mortality, readmission and the conditions end with a closed visit (DESIGN.md 3.3).
   Length of stay reads the open visit as it trained.
3. **Branch**: one step of the task token from the right state for every (patient, task)
   pair, all pairs in one batch; the clinical head gives the probability.
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

from fhir_adapter.tokenizer import TokenSequence, append_event, close_visit, with_task_token
from fhir_adapter.vocabulary import CLS, PAD, TASK_TOKENS, UNK, Vocabulary
from model.batching import collate
from model.mamba import LayerState
from model.network import STREAMS, EHRMamba, ModelState, TokenBatch
from model.onnx_step import OnnxStep
from model.state import concat, pick_captured, select
from model.tasks import Task

_NOT_FORECAST = (PAD, UNK, CLS, *TASK_TOKENS)


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
    single-token steps (task branches, forecasts) in onnxruntime instead of PyTorch; the
    scan stays in PyTorch either way.
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
        needs_close = any(task is not Task.LENGTH_OF_STAY for task in tasks)
        scans = self._scan(inputs, Task.LENGTH_OF_STAY in tasks, needs_close)
        probabilities = self._branch(inputs, tasks, scans)
        forecasts = self._forecast(inputs, scans, forecast, top_p, seed, candidates)
        return [
            PatientResult(probabilities[i], forecasts[i], scans[i].cache, scans[i].scanned)
            for i in range(len(inputs))
        ]

    # --- 1. scan ----------------------------------------------------------------------------

    def _scan(
        self, inputs: Sequence[PatientInput], want_los: bool, needs_close: bool
    ) -> list[_Scan]:
        """Scan what is new for every patient in one batch. Where the current visit is open
        and a task needs it closed, ``[VE] [REG]`` ride along at the end of the same scan,
        so closing costs two more tokens, not another pass; the end state is captured
        before them."""
        plans = [_plan(item, want_los) for item in inputs]
        scanned = [
            close_visit(item.sequence, self.vocab) if needs_close else item.sequence
            for item in inputs
        ]
        todo = [i for i, p in enumerate(plans) if p.start < len(scanned[i])]
        fresh: dict[int, tuple[torch.Tensor | None, dict[int, ModelState]]] = {}
        if todo:
            batch, _ = collate([scanned[i].suffix(plans[i].start) for i in todo])
            cuts = [plans[i].capture_cuts(len(inputs[i].sequence), len(scanned[i])) for i in todo]
            capture = torch.full((len(todo), max(len(c) for c in cuts)), -1, dtype=torch.int64)
            for row, (i, row_cuts) in enumerate(zip(todo, cuts, strict=True)):
                for col, cut in enumerate(row_cuts):
                    capture[row, col] = cut - plans[i].start - 1
            start = concat([self._start_state(inputs[i], plans[i]) for i in todo])
            hidden, _, captured = self.model(batch, start, capture)
            assert captured is not None
            for row, i in enumerate(todo):
                picked = pick_captured(
                    captured, torch.full((len(cuts[row]),), row), torch.arange(len(cuts[row]))
                )
                states = {cut: select(picked, torch.tensor([c])) for c, cut in enumerate(cuts[row])}
                last = len(inputs[i].sequence) - plans[i].start - 1
                fresh[i] = (hidden[row, last] if last >= 0 else None, states)
        scans: list[_Scan] = []
        for i, (item, plan) in enumerate(zip(inputs, plans, strict=True)):
            length = len(item.sequence)
            end_hidden, states = fresh.get(i, (None, {}))
            known = {**(item.cached.cut_states if item.cached and plan.start else {}), **states}
            if plan.start and item.cached is not None:
                known[plan.start] = item.cached.end_state
                if plan.start == length:
                    end_hidden = item.cached.end_hidden
            assert end_hidden is not None
            end_state = known[length]
            closed = known.get(len(scanned[i]), end_state)
            los_state = known.get(item.los_cut) if item.los_cut is not None else None
            keep = {item.los_cut: los_state} if item.los_cut is not None and los_state else {}
            cache = CachedScan(length, end_state, end_hidden, keep)
            scans.append(
                _Scan(end_state, end_hidden, los_state, closed, scanned[i], cache,
                      length - plan.start)
            )  # fmt: skip
        return scans

    def _start_state(self, item: PatientInput, plan: _Plan) -> ModelState:
        if plan.start and item.cached is not None:
            return item.cached.end_state
        return ModelState(tuple(b.mixer.empty_state(1) for b in self.model.backbone.blocks()))

    # --- 2 and 3. close the visit, then branch ---------------------------------------------

    def _branch(
        self, inputs: Sequence[PatientInput], tasks: Sequence[Task], scans: list[_Scan]
    ) -> list[dict[Task, float]]:
        pairs: list[tuple[int, Task, ModelState, TokenSequence]] = []
        for i, (item, scan) in enumerate(zip(inputs, scans, strict=True)):
            for task in tasks:
                if task is not Task.LENGTH_OF_STAY:
                    pairs.append((i, task, scan.closed_state, scan.closed_sequence))
                elif item.los_cut is not None and scan.los_state is not None:
                    pairs.append((i, task, scan.los_state, item.sequence.prefix(item.los_cut)))
        results: list[dict[Task, float]] = [{} for _ in inputs]
        if not pairs:
            return results
        steps = [
            with_task_token(seq, self._task_ids[task]).suffix(len(seq)) for _, task, _, seq in pairs
        ]
        batch, _ = collate(steps)
        hidden, _ = self._step(batch, concat([state for _, _, state, _ in pairs]))
        columns = torch.tensor([task.column for _, task, _, _ in pairs])
        probs = torch.sigmoid(self.model.task_logit(hidden, columns))
        for (i, task, _, _), p in zip(pairs, probs.tolist(), strict=True):
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
        state = concat([s.end_state for s in scans])
        hidden = torch.stack([s.end_hidden for s in scans])  # (b, h)
        sequences = [item.sequence for item in inputs]
        for _ in range(steps):
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
            sequences = [
                append_event(seq, int(chosen[i]), self.vocab.type_of(int(chosen[i])))
                for i, seq in enumerate(sequences)
            ]
            batch, _ = collate([seq.suffix(len(seq) - 1) for seq in sequences])
            hidden, state = self._step(batch, state)
        return [tuple(f) for f in out]

    def _step(self, batch: TokenBatch, state: ModelState) -> tuple[torch.Tensor, ModelState]:
        """One token per row (b, 1) from ``state``: hidden (b, h) and the new state, through
        onnxruntime when the engine has an exported step, else PyTorch."""
        if self.onnx_step is None:
            hidden, end, _ = self.model(batch, state)
            return hidden[:, 0], end
        columns = [getattr(batch, name)[:, 0].numpy() for name in STREAMS]
        conv = torch.stack([s.conv for s in state.layers]).numpy()
        ssm = torch.stack([s.ssm for s in state.layers]).numpy()
        hidden, _, _, conv_out, ssm_out = self.onnx_step.run(*columns, conv, ssm)
        layers = tuple(
            LayerState(torch.from_numpy(conv_out[i]), torch.from_numpy(ssm_out[i]))
            for i in range(conv_out.shape[0])
        )
        return torch.from_numpy(hidden), ModelState(layers)


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
class _Scan:
    end_state: ModelState
    end_hidden: torch.Tensor
    los_state: ModelState | None
    closed_state: ModelState  # after [VE] [REG] where the visit was open, else end_state
    closed_sequence: TokenSequence
    cache: CachedScan
    scanned: int


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
