"""Training examples and batches from a built dataset (``training/dataset.py``).

Shape letters: b batch, l padded length, k prompts per window, m prompts in a batch.

- **Pretraining**: each patient's sequence, truncated to the most recent ``max_length``
  tokens; the target at position t is the token at t+1, and padding (and the last real
  token, which has no successor) carry ``IGNORE`` so they never count in the loss.
- **Multitask Prompted Finetuning (MPF), trained as it is served**: a sample's input is the
  prefix known at its cut, then its task token, and the clinical head reads the task
  token. The engine scores that by scanning the record once and stepping each task token
  from the state at its cut (DESIGN.md 4.1), and training does the same: one *window* per
  patient holds every sample's prefix, the scan captures the state at each cut, and each
  *prompt* (task token) is one step from its captured state. A patient with five stays and
  three conditions costs one scan, not eight.
- ``both_ends`` is the paper's variant: the task token also replaces ``[CLS]``, so every
  task needs a scan of its own (one window per patient and task). That is its serving cost.

Windows hold at most ``max_length - 1`` tokens (the task token is the last input). When a
patient's record is longer, the window ends at the latest cut and earlier cuts that fall
inside it read a shorter history than their own truncation would give; cuts before it get
windows of their own. With the default window this touches about 1 % of patients.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fhir_adapter.tokenizer import TokenSequence, kept_positions, truncate, with_task_token
from fhir_adapter.vocabulary import TokenType, Vocabulary
from model.batching import collate
from model.network import TokenBatch
from model.tasks import Task
from training.dataset import read_samples, read_sequences

IGNORE = -100  # torch.nn.functional.cross_entropy's ignore_index
Variant = Literal["end", "both_ends"]
TASK_ORDER = tuple(Task)


@dataclass(frozen=True)
class Prompt:
    """One sample read from a window: the task token follows window position ``position``
    (the sample's last input token)."""

    task: Task
    label: int
    position: int
    visit_id: str


@dataclass(frozen=True)
class TaskWindow:
    """One scan's worth of input and the samples read from it."""

    source: int
    patient_id: str
    sequence: TokenSequence
    prompts: tuple[Prompt, ...]


@dataclass(frozen=True)
class WindowBatch:
    """Windows padded to (b, l); ``capture`` (b, k) the positions to branch from (-1 none);
    per prompt (m,): its row and slot in ``capture``, its task token (m, 1), ``Task.column``
    and float label."""

    inputs: TokenBatch
    capture: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    task_tokens: TokenBatch
    tasks: torch.Tensor
    labels: torch.Tensor


def pretraining_sequences(dataset: Path, split: str, max_length: int) -> Iterator[TokenSequence]:
    """The split's patients, each truncated to its most recent ``max_length`` tokens."""
    for row in read_sequences(dataset, split):
        yield truncate(row.sequence, max_length)


def next_token_batch(sequences: Sequence[TokenSequence]) -> tuple[TokenBatch, torch.Tensor]:
    """Inputs (b, l) and next-token targets (b, l), ``IGNORE`` where there is no target."""
    batch, lengths = collate(sequences)
    targets = torch.full_like(batch.concept, IGNORE)
    targets[:, :-1] = batch.concept[:, 1:]
    positions = torch.arange(batch.concept.shape[1])
    targets[positions.unsqueeze(0) >= (lengths - 1).unsqueeze(1)] = IGNORE
    return batch, targets


def is_validation(source: int, patient_id: str, fraction: float = 0.2) -> bool:
    """Whether a finetune-split patient is held out for validation (stable hash, so every
    method and seed sees the same validation patients)."""
    digest = hashlib.sha256(f"validation:{source}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def task_windows(
    dataset: Path,
    split: str,
    vocab: Vocabulary,
    *,
    max_length: int,
    variant: Variant = "end",
    tasks: Sequence[Task] = TASK_ORDER,
    validation: bool | None = None,
) -> list[TaskWindow]:
    """The windows holding every sample of ``split`` for ``tasks``. ``validation`` keeps
    only validation patients (True), only the others (False), or all (None)."""
    wanted = {task.value for task in tasks}
    by_patient: dict[tuple[int, str], list[dict[str, object]]] = defaultdict(list)
    for sample in read_samples(dataset).to_pylist():
        if sample["split"] == split and sample["task"] in wanted:
            by_patient[(int(sample["source"]), str(sample["patient_id"]))].append(sample)
    windows: list[TaskWindow] = []
    for row in read_sequences(dataset, split):
        key = (row.source, row.patient_id)
        if key not in by_patient:
            continue
        if validation is not None and is_validation(*key) != validation:
            continue
        samples = by_patient[key]
        if variant == "end":
            groups = [samples]
        else:
            per_task: dict[str, list[dict[str, object]]] = defaultdict(list)
            for sample in samples:
                per_task[str(sample["task"])].append(sample)
            groups = [per_task[t.value] for t in TASK_ORDER if t.value in per_task]
        for group in groups:
            for sequence, prompts in _windows(row.sequence, group, max_length - 1):
                if variant == "both_ends":
                    sequence = _task_token_first(sequence, vocab.id(prompts[0].task.token))
                windows.append(TaskWindow(row.source, row.patient_id, sequence, prompts))
    return windows


def window_batch(windows: Sequence[TaskWindow], vocab: Vocabulary) -> WindowBatch:
    """Pad windows into one batch and lay out their prompts' branch steps."""
    inputs, _ = collate([w.sequence for w in windows])
    k = max(len(w.prompts) for w in windows)
    capture = torch.full((len(windows), k), -1, dtype=torch.int64)
    rows, slots, steps, task_index, labels = [], [], [], [], []
    for row, window in enumerate(windows):
        for slot, prompt in enumerate(window.prompts):
            capture[row, slot] = prompt.position
            rows.append(row)
            slots.append(slot)
            prefix = window.sequence.prefix(prompt.position + 1)
            steps.append(with_task_token(prefix, vocab.id(prompt.task.token)).suffix(len(prefix)))
            task_index.append(prompt.task.column)
            labels.append(float(prompt.label))
    task_tokens, _ = collate(steps)
    return WindowBatch(
        inputs=inputs,
        capture=capture,
        rows=torch.tensor(rows, dtype=torch.int64),
        slots=torch.tensor(slots, dtype=torch.int64),
        task_tokens=task_tokens,
        tasks=torch.tensor(task_index, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.float32),
    )


def by_length(lengths: Sequence[int], max_tokens: int, seed: int | None) -> list[list[int]]:
    """Indices grouped into batches of similar length, each at most ``max_tokens`` padded
    tokens (at least one item); batches shuffled with ``seed`` (None keeps length order).
    Sorting by length keeps padding, which costs as much as real tokens, small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if seed is not None:
        rng = np.random.default_rng(seed)
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _windows(
    whole: TokenSequence, samples: list[dict[str, object]], limit: int
) -> Iterator[tuple[TokenSequence, tuple[Prompt, ...]]]:
    """Cover the samples' cuts with as few windows of at most ``limit`` tokens as possible:
    each window ends at the latest cut not yet covered."""
    remaining = sorted(samples, key=lambda s: int(str(s["cut_length"])), reverse=True)
    while remaining:
        end = int(str(remaining[0]["cut_length"]))
        prefix = whole.prefix(end)
        kept = kept_positions(prefix, limit)
        window = truncate(prefix, limit)
        first_kept = 0 if kept is None else _tail_start(kept)
        offset = 0 if kept is None else len(kept) - end  # window position - original
        inside = [s for s in remaining if int(str(s["cut_length"])) - 1 >= first_kept]
        remaining = [s for s in remaining if int(str(s["cut_length"])) - 1 < first_kept]
        prompts = tuple(
            Prompt(
                task=Task(str(s["task"])),
                label=int(str(s["label"])),
                position=int(str(s["cut_length"])) - 1 + offset,
                visit_id=str(s["visit_id"] or ""),
            )
            for s in sorted(inside, key=lambda s: int(str(s["cut_length"])))
        )
        yield window, prompts


def _tail_start(kept: np.ndarray) -> int:
    """The first position of the contiguous run that ends a truncated window's kept
    positions (before it: the re-prepended ``[CLS]``, maybe ``[VS]``)."""
    gaps = np.flatnonzero(np.diff(kept) != 1)
    return int(kept[gaps[-1] + 1]) if gaps.size else int(kept[0])


def _task_token_first(seq: TokenSequence, task_token_id: int) -> TokenSequence:
    """The paper's MPF: the task token also stands where ``[CLS]`` was."""
    concept = seq.concept.copy()
    kinds = seq.type.copy()
    concept[0] = task_token_id
    kinds[0] = np.int8(TokenType.TASK)
    return replace(seq, concept=concept, type=kinds)
