"""Are the integrated-gradients explanations faithful, and how many steps do they need?
(``ehrmamba bench faithfulness``; tables in docs/results.md and docs/benchmarks.md.)

- **Deletion** (the default): for test samples of every task with enough positives, delete
  the k events with the largest attribution from the input the engine scores, and compare
  the fall in the task's probability with deleting k events drawn at random (several draws,
  fixed seeds). Explanations that point at what the model used make the first fall more.
  Only samples with more than k seen events count for k (with fewer, both deletions are the
  same set). Deletion is done inside the model's window, so no older token slides in.
- **Steps** (``--sweep``): completeness gap and time against the number of integration
  steps, for the dataset's longest record cut to a window of ``length`` tokens.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fhir_adapter.tokenizer import TokenSequence, close_visit, truncate
from fhir_adapter.vocabulary import Vocabulary
from model.artifact import Artifact, load_artifact
from model.engine import Engine, PatientInput
from model.explain import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_STEPS,
    EventAttribution,
    Explainer,
    Explanation,
)
from model.tasks import Task
from training.dataset import read_samples, read_sequences

T = TypeVar("T")
KS = (1, 3, 5, 10)
SWEEP_STEPS = (4, 8, 16, 32, 64)
PER_BATCH = (1, 2, 4, 8, 16, 32)
BATCH_LIMIT = 16384  # tokens in one backward pass, at most (about 5 GB of activations)


@dataclass(frozen=True)
class Deletion:
    """One task and k: mean fall of the probability when the top-k attributed events are
    deleted and when k random events are, and the fraction of samples where top-k falls
    more than the mean of that sample's random draws."""

    task: str
    k: int
    samples: int
    positives: int
    top_drop: float
    random_drop: float
    top_wins: float


@dataclass(frozen=True)
class DeletionRun:
    rows: list[Deletion]
    explained: int
    mean_abs_gap: float
    worst_relative_gap: float  # max |gap| / |p - p0|
    steps: int
    seconds: float
    others_cpu: float  # share of all cores other processes took during the run


@dataclass(frozen=True)
class StepsRow:
    task: str
    tokens: int
    steps: int
    per_batch: int  # steps in one backward pass
    seconds: float
    score_seconds: float  # the engine scoring the same input, for scale
    peak_mb: float  # the process's peak resident memory so far
    others_cpu: float  # share of all cores other processes took during the row
    gap: float  # sum of attributions - (p - p0)
    relative_gap: float  # |gap| / |p - p0|
    probability: float
    baseline_probability: float


def deletion(
    dataset: Path,
    model: Path,
    *,
    samples: int,
    draws: int,
    ks: Sequence[int] = KS,
    min_positives: int = 5,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> DeletionRun:
    """The deletion test on the test split; at most ``samples`` per task, half of them
    positives where there are enough (chosen with ``seed``). ``progress(task, done,
    total)`` after each sample: a run takes tens of minutes on a CPU."""
    started = time.perf_counter()
    cpu = _OthersCpu()
    artifact = _matching(dataset, model)
    explainer = Explainer(artifact.model, artifact.vocab, artifact.config.max_length)
    engine = Engine(artifact.model, artifact.vocab)
    records = {(r.source, r.patient_id): r.sequence for r in read_sequences(dataset, "test")}
    falls: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    gaps: list[float] = []
    relative: list[float] = []
    for task, chosen in _samples(dataset, artifact, samples, min_positives, seed):
        for index, (key, cut, label) in enumerate(chosen):
            window = truncate(records[key].prefix(cut), artifact.config.max_length)
            los_cut = len(window) if task is Task.LENGTH_OF_STAY else None
            explanation = explainer.explain(window, task, los_cut=los_cut, steps=steps)
            gaps.append(abs(explanation.completeness_gap))
            change = abs(explanation.probability - explanation.baseline_probability)
            relative.append(gaps[-1] / change if change else 0.0)
            for k, top, randoms in _deletions(engine, task, window, explanation, ks, draws,
                                              seed + index):  # fmt: skip
                falls.setdefault((task.value, k), []).append((label, top, randoms))
            if progress is not None:
                progress(task.value, index + 1, len(chosen))
    rows = [
        Deletion(
            task=task,
            k=k,
            samples=len(found),
            positives=sum(label for label, _, _ in found),
            top_drop=statistics.fmean(top for _, top, _ in found),
            random_drop=statistics.fmean(rnd for _, _, rnd in found),
            top_wins=statistics.fmean(float(top > rnd) for _, top, rnd in found),
        )
        for (task, k), found in falls.items()
    ]
    return DeletionRun(
        rows=rows,
        explained=len(gaps),
        mean_abs_gap=statistics.fmean(gaps) if gaps else 0.0,
        worst_relative_gap=max(relative, default=0.0),
        steps=steps,
        seconds=time.perf_counter() - started,
        others_cpu=cpu.share(),
    )


def steps_sweep(
    dataset: Path,
    model: Path,
    *,
    length: int,
    tasks: Sequence[Task],
    steps: Sequence[int] = SWEEP_STEPS,
    per_batch: Sequence[int] = PER_BATCH,
    repeats: int = 2,
) -> Iterator[StepsRow]:
    """For the dataset's longest record in a window of ``length`` tokens: first the first
    task at ``DEFAULT_STEPS`` with ``per_batch`` steps in one backward pass (in increasing
    order, so the process's peak memory read after a row is that row's; at most
    ``BATCH_LIMIT`` tokens), then every task at every number of ``steps`` with the default
    batching. Seconds are the fastest of ``repeats`` runs, the engine's
    scoring of the same input beside them: the machine is shared, and the fastest run is
    the one least disturbed."""
    artifact = _matching(dataset, model)
    explainer = Explainer(artifact.model, artifact.vocab, length)
    longest: TokenSequence | None = None
    for split in ("pretrain", "finetune", "test"):
        for row in read_sequences(dataset, split):
            if longest is None or len(row.sequence) > len(longest):
                longest = row.sequence
    if longest is None or len(longest) < length:
        raise ValueError(f"{dataset} has no record of {length} tokens")
    record = longest
    engine = Engine(artifact.model, artifact.vocab)
    window = truncate(record, length)
    input_length = len(close_visit(window, artifact.vocab)) + 1  # + the task token
    explainer.explain(record, tasks[0], steps=1)  # loads the compiled scan once

    def measure(task: Task, count: int, batch_tokens: int) -> StepsRow:
        cpu = _OthersCpu()
        score_seconds = min(
            _seconds(lambda: engine.score([PatientInput(window)], [task])) for _ in range(5)
        )
        runs = [
            _timed(lambda: explainer.explain(record, task, steps=count,
                                             batch_tokens=batch_tokens))
            for _ in range(repeats)
        ]  # fmt: skip
        e = runs[0][0]
        change = e.probability - e.baseline_probability
        return StepsRow(
            task=task.value,
            tokens=input_length,
            steps=count,
            per_batch=min(count, max(1, batch_tokens // input_length)),
            seconds=min(seconds for _, seconds in runs),
            score_seconds=score_seconds,
            peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            others_cpu=cpu.share(),
            gap=e.completeness_gap,
            relative_gap=abs(e.completeness_gap) / abs(change) if change else 0.0,
            probability=e.probability,
            baseline_probability=e.baseline_probability,
        )

    for batch in sorted(b for b in per_batch if b * input_length <= BATCH_LIMIT):
        yield measure(tasks[0], DEFAULT_STEPS, batch * input_length)
    for task in tasks:
        for count in steps:
            yield measure(task, count, DEFAULT_BATCH_TOKENS)


def deletion_table(run: DeletionRun) -> str:
    lines = [
        "| task | k | samples (positives) | mean drop, top-k | mean drop, random k "
        "| top-k drops more |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in run.rows:
        lines.append(
            f"| {r.task} | {r.k} | {r.samples} ({r.positives}) | {r.top_drop:.4f} "
            f"| {r.random_drop:.4f} | {r.top_wins:.0%} |"
        )
    lines.append("")
    lines.append(
        f"{run.explained} explanations at {run.steps} steps; mean |completeness gap| "
        f"{run.mean_abs_gap:.5f}, largest {run.worst_relative_gap:.2%} of p - p0; "
        f"{run.seconds:.0f} s, other processes took {run.others_cpu:.0%} of the cores"
    )
    return "\n".join(lines)


def steps_table(rows: Sequence[StepsRow]) -> str:
    lines = [
        "| task | tokens | steps | per batch | seconds | x one score | peak MB | gap "
        "| gap / (p - p0) | p | p0 | others' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.tokens:,} | {r.steps} | {r.per_batch} | {r.seconds:.1f} "
            f"| {r.seconds / r.score_seconds:.0f} | {r.peak_mb:,.0f} | {r.gap:+.4f} "
            f"| {r.relative_gap:.2%} | {r.probability:.3f} | {r.baseline_probability:.3f} "
            f"| {r.others_cpu:.0%} |"
        )
    return "\n".join(lines)


def as_json(row: Deletion | StepsRow) -> str:
    doc: dict[str, Any] = asdict(row)
    return json.dumps(doc)


def summary_json(run: DeletionRun) -> str:
    """The run's figures besides its rows."""
    doc: dict[str, Any] = {k: v for k, v in asdict(run).items() if k != "rows"}
    return json.dumps(doc)


class _OthersCpu:
    """How busy other processes kept the machine since this was made: the machine is
    shared, and a timing means little without it. From /proc/stat (all processes) less
    this process's own CPU time."""

    def __init__(self) -> None:
        self._start = (time.perf_counter(), _machine_busy(), _own_cpu())

    def share(self) -> float:
        wall = time.perf_counter() - self._start[0]
        others = (_machine_busy() - self._start[1]) - (_own_cpu() - self._start[2])
        return max(others, 0.0) / (wall * (os.cpu_count() or 1))


def _machine_busy() -> float:
    """CPU seconds all processes have used since boot (idle and iowait left out)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _seconds(fn: Callable[[], object]) -> float:
    return _timed(fn)[1]


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    begun = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - begun


def _matching(dataset: Path, model: Path) -> Artifact:
    """The artifact, refused unless the dataset was tokenized with its vocabulary and bins
    (token ids would mean other codes)."""
    artifact = load_artifact(model)
    same_vocab = Vocabulary.load(dataset / "vocab.json").tokens == artifact.vocab.tokens
    bins = [json.loads(p.read_text()) for p in (dataset / "lab_bins.json", model / "lab_bins.json")]
    if not same_vocab or bins[0] != bins[1]:
        raise ValueError(f"{dataset} was not tokenized with {model}'s vocabulary and lab bins")
    return artifact


Sample = tuple[tuple[int, str], int, int]  # (source, patient id), cut length, label


def _samples(
    dataset: Path, artifact: Artifact, cap: int, min_positives: int, seed: int
) -> Iterator[tuple[Task, list[Sample]]]:
    """Per served task with at least ``min_positives`` test positives: up to ``cap``
    samples, positives up to half of them, the rest negatives, in a seeded order."""
    rows = [r for r in read_samples(dataset).to_pylist() if r["split"] == "test"]
    rng = np.random.default_rng(seed)
    for task in artifact.config.tasks:
        mine: list[Sample] = [
            ((int(r["source"]), str(r["patient_id"])), int(r["cut_length"]), int(r["label"]))
            for r in rows
            if r["task"] == task.value
        ]
        positives = [s for s in mine if s[2]]
        negatives = [s for s in mine if not s[2]]
        if len(positives) < min_positives:
            continue
        take_positive = min(len(positives), max(cap // 2, cap - len(negatives)))
        picked = [positives[i] for i in rng.permutation(len(positives))[:take_positive]]
        rest = cap - len(picked)
        picked += [negatives[i] for i in rng.permutation(len(negatives))[:rest]]
        yield task, picked


def _deletions(
    engine: Engine,
    task: Task,
    window: TokenSequence,
    explanation: Explanation,
    ks: Sequence[int],
    draws: int,
    seed: int,
) -> Iterator[tuple[int, float, float]]:
    """(k, fall with the top-k events deleted, mean fall over the random draws), all inputs
    scored in one engine call."""
    seen = [e for e in explanation.events if e.seen]
    ranked = sorted(range(len(seen)), key=lambda i: -seen[i].attribution)
    rng = np.random.default_rng(seed)
    plans: list[tuple[int, list[int]]] = []  # (k, events to delete)
    for k in ks:
        if len(seen) <= k:
            continue
        plans.append((k, ranked[:k]))
        plans += [(k, list(rng.choice(len(seen), size=k, replace=False))) for _ in range(draws)]
    if not plans:
        return
    inputs = [window] + [_without(window, explanation, [seen[i] for i in d]) for _, d in plans]
    probabilities = [
        r.probabilities[task]
        for r in engine.score(
            [PatientInput(s, los_cut=len(s) if task is Task.LENGTH_OF_STAY else None)
             for s in inputs],
            [task],
        )
    ]  # fmt: skip
    falls = [probabilities[0] - p for p in probabilities[1:]]
    at = 0
    for k in ks:
        if len(seen) <= k:
            continue
        yield k, falls[at], statistics.fmean(falls[at + 1 : at + 1 + draws])
        at += 1 + draws


def _without(
    window: TokenSequence, explanation: Explanation, events: Sequence[EventAttribution]
) -> TokenSequence:
    """The window with the tokens of ``events`` removed."""
    gone = {explanation.tokens[i].input_position for event in events for i in event.tokens}
    keep = np.array([i for i in range(len(window)) if i not in gone], dtype=np.int64)
    return TokenSequence(
        concept=window.concept[keep], type=window.type[keep], age=window.age[keep],
        time=window.time[keep], segment=window.segment[keep],
        visit_order=window.visit_order[keep], timestamp=window.timestamp[keep],
        truncated=window.truncated,
    )  # fmt: skip
