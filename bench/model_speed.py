"""Model speed on this machine, side by side in one run (`ehrmamba bench model`).

Cases (random weights; timing does not depend on them):
- ``full_forward``: hidden states for one sequence of 512 / 2,048 / 8,192 / 65,536 tokens:
  our scan (``ours``), the stock ``transformers`` Mamba CPU path, and a BERT of the same
  width and depth with PyTorch SDPA attention. The stock path and BERT are skipped at
  65,536 tokens (minutes, gigabytes); ours runs there in chunks of 8,192 tokens carried by
  the recurrent state, which bounds memory.
- ``six_tasks_forecast``: six task probabilities plus a 10-event forecast at 2,048 tokens,
  one pass with branching (``ours_one_pass``) against six separate full passes.
- ``append_10_events``: ten new events on a cached 2,048-token state against recomputing:
  the state update alone (``ours_state_update`` vs ``ours_full_forward``), and with scoring
  six tasks (``ours_incremental`` vs ``ours_recompute``, both through the engine). Each
  twice: updates back to back (weights in the caches), and each right after a full pass
  (``..._after_full_pass``: weights fetched again).
- ``few_tokens``: forwards of 1 to 256 tokens from a state: the whole network in one
  compiled call (``ours_packed``) against the blocks as tensor operations (``ours_blocks``).
- ``recurrent_step``: one token through the step, PyTorch against onnxruntime; and the
  one-pass case again with the forecast's single-token steps in onnxruntime
  (``ours_one_pass_onnx_steps``; task tokens ride in the scan, so an incremental score
  without a forecast has no single-token steps left to move).
- ``train_step``: forward and backward of a next-token loss, compiled backward against
  autograd through the reference loop.
- ``compute_floor``: FLOPs of the forward over the measured matmul throughput.

Every measurement is a median over ``runs`` after a warm-up call; the implementations of a
case are timed in turns, so their ratio holds on this machine, whose speed drifts. ``peak_mb``
is the largest rise of this process's resident memory during the warm-up call, sampled every
5 ms.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.synthetic import synthetic_batch
from fhir_adapter.tokenizer import TokenSequence, with_task_token
from fhir_adapter.vocabulary import TokenType, Vocabulary
from model import packed, scan
from model.batching import collate
from model.config import ModelConfig, sized
from model.engine import Engine, PatientInput
from model.interop import to_transformers
from model.network import EHRMamba, TokenBatch
from model.onnx_step import OnnxStep, StepGraph, example_inputs, export_step
from model.state import ModelState
from model.tasks import Task

LENGTHS = (512, 2048, 8192, 65536)
REFERENCE_LIMIT = 8192  # longest sequence the stock path and BERT are run at
LONG_CHUNK = 8192


@dataclass
class Measurement:
    case: str
    impl: str
    size: str
    tokens: int
    median_s: float
    peak_mb: float
    runs: int
    note: str = ""


CASES = ("forward", "serving", "training", "floor")


def run(
    sizes: tuple[str, ...] = ("compact", "paper"),
    quick: bool = False,
    cases: tuple[str, ...] = CASES,
) -> Iterator[Measurement]:
    """Yield measurements as they are made (``quick``: shorter sequences, one run each;
    ``cases``: which groups to run; serving cases run at the compact size)."""
    torch.manual_seed(0)
    vocab = _vocabulary(500)
    lengths = (512, 2048) if quick else LENGTHS
    for size in sizes:
        config = sized(size, len(vocab), dropout=0.0)
        ours = EHRMamba(config).eval()
        size_lengths = lengths if size == "compact" else (2048,)
        if "forward" in cases:
            for tokens in size_lengths:
                yield from _full_forward(ours, config, size, tokens, quick)
        if "serving" in cases and size == "compact":
            yield from _serving_cases(ours, vocab, quick)
            yield from _few_tokens(ours, quick)
        if "training" in cases and size == "compact":
            yield from _training_cases(ours, config)
        if "floor" in cases:
            yield _floor(config, 2048)


def _full_forward(
    ours: EHRMamba, config: ModelConfig, size: str, tokens: int, quick: bool
) -> Iterator[Measurement]:
    runs = 1 if quick or tokens > 2048 or size == "paper" else 5
    batch = synthetic_batch(1, tokens, config.vocab_size)
    entries = [Entry("ours", tokens, runs, lambda: _forward_chunked(ours, batch))]
    if tokens <= REFERENCE_LIMIT:
        stock = to_transformers(ours)
        embeds = ours.input_embeddings(batch).detach()
        bert = _bert(config)
        entries += [
            Entry("transformers", tokens, 1, lambda: stock(inputs_embeds=embeds)),
            Entry("bert", tokens, runs, lambda: bert(input_ids=batch.concept)),
        ]
    yield from measure_together("full_forward", size, entries)
    if tokens > REFERENCE_LIMIT:
        for impl in ("transformers", "bert"):
            skipped = "skipped: minutes and gigabytes"
            yield Measurement("full_forward", impl, size, tokens, math.nan, math.nan, 0, skipped)


def _serving_cases(model: EHRMamba, vocab: Vocabulary, quick: bool) -> Iterator[Measurement]:
    """Each comparison is timed in turns (``measure_together``); the incremental cases take as
    many runs as their short partner, so both see the same stretch of the machine."""
    engine = Engine(model, vocab)
    seq = _sequence(2048, vocab)
    runs = 1 if quick else 5
    small_runs = 1 if quick else 20  # comparisons with a case of a few milliseconds
    one = PatientInput(seq, los_cut=len(seq) - 300)

    def six_passes() -> None:
        for task in Task:
            full = with_task_token(seq, vocab.id(task.token))
            engine.model(collate([full])[0])

    graph = StepGraph(model)
    inputs = example_inputs(model, batch=1, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        step = OnnxStep(export_step(model, Path(tmp) / "step.onnx"))
        onnx_engine = Engine(model, vocab, step)
        arrays = [t.numpy() for t in inputs]
        tokens = len(seq)
        yield from measure_together(
            "six_tasks_forecast",
            "compact",
            [
                Entry("ours_one_pass", tokens, runs,
                      lambda: engine.score([one], list(Task), forecast=10)),
                Entry("ours_one_pass_onnx_steps", tokens, runs,
                      lambda: onnx_engine.score([one], list(Task), forecast=10)),
                Entry("ours_six_passes", tokens, runs, six_passes),
            ],
        )  # fmt: skip
        step_runs = 50 if not quick else 5
        yield from measure_together(
            "recurrent_step",
            "compact",
            [
                Entry("ours", 1, step_runs, lambda: graph(*inputs)),
                Entry("onnxruntime", 1, step_runs, lambda: step.run(*arrays)),
            ],
        )
    longer = _sequence(2058, vocab)
    [first] = engine.score([PatientInput(longer.prefix(2048))], list(Task))
    cached = PatientInput(longer, cached=first.cache)
    whole = synthetic_batch(1, 2058, len(vocab))
    head, tail = _split(whole, 2048)
    with torch.no_grad():
        _, state, _ = model(head)
    for warm in (True, False):
        # Back to back, an update finds the weights in the caches (as a stream of updates
        # does); right after a recompute it fetches them again (as after other work).
        burst, note = (5, "5 in a row per turn") if warm else (1, "right after a full pass")
        suffix = "" if warm else "_after_full_pass"
        yield from measure_together(
            "append_10_events",
            "compact",
            [
                Entry(f"ours_state_update{suffix}", 10, small_runs,
                      lambda: model(tail, state), burst, note),
                Entry("ours_full_forward", 2058, small_runs, lambda: model(whole)),
            ],
        )  # fmt: skip
        yield from measure_together(
            "append_10_events",
            "compact",
            [
                Entry(f"ours_incremental{suffix}", 10, small_runs,
                      lambda: engine.score([cached], list(Task)), burst, note),
                Entry("ours_recompute", 2058, small_runs,
                      lambda: engine.score([PatientInput(longer)], list(Task))),
            ],
        )  # fmt: skip


def _few_tokens(model: EHRMamba, quick: bool) -> Iterator[Measurement]:
    """Short forwards from a state, as an incremental update or a forecast step makes: the
    whole network in one compiled call (``ours_packed``, ``model.packed``) against the
    blocks as tensor operations (``ours_blocks``), which longer sequences take. Where they
    cross is where ``packed.FEW_TOKENS`` should be."""
    vocab_size = model.config.vocab_size
    with torch.no_grad():
        _, state, _ = model(synthetic_batch(1, 64, vocab_size))
    runs = 1 if quick else 30
    for tokens in (1, 17, 64, 256):
        forward = functools.partial(model, synthetic_batch(1, tokens, vocab_size), state)
        yield from measure_together(
            "few_tokens",
            "compact",
            [
                Entry("ours_packed", tokens, runs, _with_packed_limit(10**9, forward)),
                Entry("ours_blocks", tokens, runs, _with_packed_limit(0, forward)),
            ],
        )


# --- what is measured ------------------------------------------------------------------------


def _forward_chunked(model: EHRMamba, batch: TokenBatch) -> torch.Tensor:
    """Hidden states for the whole sequence, scanned in chunks carried by the state."""
    length = batch.concept.shape[1]
    state: ModelState | None = None
    outs = []
    for start in range(0, length, LONG_CHUNK):
        part = TokenBatch(
            *(
                getattr(batch, f)[:, start : start + LONG_CHUNK]
                for f in TokenBatch.__dataclass_fields__
            )
        )
        hidden, state, _ = model(part, state)
        outs.append(hidden)
    return torch.cat(outs, dim=1)


def _training_cases(model: EHRMamba, config: ModelConfig) -> Iterator[Measurement]:
    """Forward and backward of a next-token loss: compiled backward against autograd
    through the reference loop (128 tokens: the reference takes seconds), then the
    compiled path at a training-sized batch of 4 x 512."""
    model.train()

    def train_step(batch: TokenBatch) -> None:
        with torch.enable_grad():
            hidden, _, _ = model(batch)
            model.next_token_logits(hidden).logsumexp(-1).mean().backward()
        model.zero_grad()

    small = synthetic_batch(1, 128, config.vocab_size)
    yield _measure(
        "train_step", "ours_compiled_backward", "compact", 128, 3, lambda: train_step(small)
    )
    with _reference_scan():
        yield _measure(
            "train_step", "ours_reference_autograd", "compact", 128, 1, lambda: train_step(small)
        )
    large = synthetic_batch(4, 512, config.vocab_size)
    yield _measure(
        "train_step", "ours_compiled_backward", "compact", 2048, 3, lambda: train_step(large)
    )
    model.eval()


@contextmanager
def _reference_scan() -> Iterator[None]:
    compiled = scan.compiled_scan
    scan.compiled_scan = scan.reference_scan
    try:
        yield
    finally:
        scan.compiled_scan = compiled


def _with_packed_limit(tokens: int, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with forwards of up to ``tokens`` taking the packed path meanwhile."""

    def limited() -> object:
        limit = packed.FEW_TOKENS
        packed.FEW_TOKENS = tokens
        try:
            return fn()
        finally:
            packed.FEW_TOKENS = limit

    return limited


def _split(batch: TokenBatch, at: int) -> tuple[TokenBatch, TokenBatch]:
    names = TokenBatch.__dataclass_fields__
    return (
        TokenBatch(*(getattr(batch, f)[:, :at] for f in names)),
        TokenBatch(*(getattr(batch, f)[:, at:] for f in names)),
    )


def _bert(config: ModelConfig) -> Any:
    from transformers import BertConfig, BertModel

    heads = max(config.hidden_size // 64, 1)
    model = BertModel(
        BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            intermediate_size=4 * config.hidden_size,
            max_position_embeddings=REFERENCE_LIMIT,
            attn_implementation="sdpa",  # type: ignore[call-arg]
        ),
        add_pooling_layer=False,
    )
    return model.eval()


def _floor(config: ModelConfig, tokens: int) -> Measurement:
    """Matmul FLOPs plus scan FLOPs of one forward, over the measured matmul throughput."""
    h, d, n, r = config.hidden_size, config.intermediate_size, config.state_size, config.dt_rank
    per_layer = 2 * (h * 2 * d + d * (r + 2 * n) + r * d + d * h) + 6 * d * n + 8 * d
    flops = tokens * (config.num_hidden_layers * per_layer + 2 * (h + 64) * h)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    peak = 2 * 2048**3 / statistics.median(times)
    size = "compact" if config.hidden_size == 256 else "paper"
    note = f"{flops / tokens / 1e6:.1f} MFLOP per token; matmul peak {peak / 1e9:.0f} GFLOP/s"
    return Measurement("compute_floor", "floor", size, tokens, flops / peak, 0.0, 5, note)


# --- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One implementation of a case: what it is called, its tokens, how many turns to time
    it in, the call to time, and how many calls in a row it makes per turn (``runs *
    burst`` timings in all)."""

    impl: str
    tokens: int
    runs: int
    fn: Callable[[], object]
    burst: int = 1  # timed calls in a row per turn
    note: str = ""


def _measure(
    case: str, impl: str, size: str, tokens: int, runs: int, fn: Callable[[], object]
) -> Measurement:
    [measurement] = measure_together(case, size, [Entry(impl, tokens, runs, fn)])
    return measurement


def measure_together(case: str, size: str, entries: list[Entry]) -> list[Measurement]:
    """The implementations of one case timed in turns (a, b, a, b, ...), so that the ratio
    of their medians compares them on the same machine: this one's speed drifts by up to
    2x from minute to minute, and medians taken minutes apart inherit the drift. An entry
    with fewer runs than the others sits out the last turns.

    Each entry's untimed warm-up call (compilation, allocator) is the one its peak memory
    rise is sampled over, from the level before it: the sampler's wake-ups every 5 ms take
    the interpreter lock and a core, and made a timed call of a few milliseconds look 1.5x
    to 2x slower here."""
    times: list[list[float]] = [[] for _ in entries]
    peaks: list[float] = []
    with torch.no_grad():
        for entry in entries:
            with _peak_rss() as peak:
                entry.fn()
            peaks.append(peak())
        for turn in range(max(entry.runs for entry in entries)):
            for entry, spent in zip(entries, times, strict=True):
                for _ in range(entry.burst if turn < entry.runs else 0):
                    started = time.perf_counter()
                    entry.fn()
                    spent.append(time.perf_counter() - started)
    return [
        Measurement(case, e.impl, size, e.tokens, statistics.median(t), p, len(t), e.note)
        for e, t, p in zip(entries, times, peaks, strict=True)
    ]


@contextmanager
def _peak_rss() -> Iterator[Callable[[], float]]:
    """Samples this process's resident memory every 5 ms; yields a reader of the peak rise."""
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: max(peak[0] - base, 0.0)
    finally:
        done.set()
        thread.join()


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


# --- synthetic inputs -----------------------------------------------------------------------


def _vocabulary(codes: int) -> Vocabulary:
    return Vocabulary(
        [f"LOINC|{i}" for i in range(codes - 29)],
        1,
        {f"LOINC|{i}": TokenType.LAB for i in range(codes - 29)},
    )


def _sequence(tokens: int, vocab: Vocabulary) -> TokenSequence:
    """One open visit of lab events: ``[CLS] [VS] e e ...``."""
    concept = np.concatenate(
        [[vocab.id("[CLS]"), vocab.id("[VS]")], np.arange(tokens - 2) % (len(vocab) - 29) + 29]
    ).astype(np.int32)
    kinds = np.full(tokens, int(TokenType.LAB), dtype=np.int8)
    kinds[:2] = (TokenType.SPECIAL, TokenType.VISIT_START)
    stamps = 1_700_000_000 + np.arange(tokens, dtype=np.int64) * 60
    return TokenSequence(
        concept=concept,
        type=kinds,
        age=np.full(tokens, 64.0, dtype=np.float32),
        time=(stamps / 604800).astype(np.float32),
        segment=np.r_[0, np.ones(tokens - 1)].astype(np.int8),
        visit_order=np.r_[0, np.ones(tokens - 1)].astype(np.int32),
        timestamp=stamps,
    )


def table(measurements: list[Measurement]) -> str:
    """A Markdown table of the measurements."""
    lines = [
        "| case | impl | size | tokens | median s | peak MB | runs | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for m in measurements:
        median = "-" if m.runs == 0 else f"{m.median_s:.4f}"
        peak = "-" if m.runs == 0 else f"{m.peak_mb:.0f}"
        lines.append(
            f"| {m.case} | {m.impl} | {m.size} | {m.tokens:,} | {median} | {peak} "
            f"| {m.runs} | {m.note} |"
        )
    return "\n".join(lines)


def as_json(m: Measurement) -> str:
    doc: dict[str, Any] = asdict(m)
    for key in ("median_s", "peak_mb"):
        if doc[key] != doc[key]:  # NaN: not measured
            doc[key] = None
    return json.dumps(doc)
