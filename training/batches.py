"""Training examples and batches from a built dataset (``training/dataset.py``).

Shape letters: b batch, l padded length.

- **Pretraining**: each patient's sequence, truncated to the most recent ``max_length``
  tokens; the target at position t is the token at t+1, and padding (and the last real
  token, which has no successor) carry ``IGNORE`` so they never count in the loss.
- **Multitask Prompted Finetuning (MPF)**: each sample's input is the prefix known at its cut
  (``cut_length``), truncated to leave room for the task token, then the task token at the
  end; the clinical head is read there. This is the variant the engine serves (DESIGN.md 3.3).
  ``both_ends`` is the paper's variant: the task token also replaces ``[CLS]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fhir_adapter.tokenizer import TokenSequence, truncate, with_task_token
from fhir_adapter.vocabulary import TokenType, Vocabulary
from model.batching import collate
from model.network import TokenBatch
from model.tasks import Task
from training.dataset import read_samples, read_sequences

IGNORE = -100  # torch.nn.functional.cross_entropy's ignore_index
Variant = Literal["end", "both_ends"]


@dataclass(frozen=True)
class TaskExample:
    """One MPF input ending in its task token, and its label."""

    source: int
    patient_id: str
    task: Task
    label: int
    sequence: TokenSequence


@dataclass(frozen=True)
class TaskBatch:
    """A padded MPF batch: inputs (b, l), the position of each task token (b,), the task
    index into ``Task`` (b,) and float labels (b,)."""

    inputs: TokenBatch
    positions: torch.Tensor
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


def task_examples(
    dataset: Path,
    split: str,
    vocab: Vocabulary,
    *,
    max_length: int,
    variant: Variant = "end",
    tasks: Sequence[Task] = tuple(Task),
) -> list[TaskExample]:
    """Every sample of ``split`` for ``tasks`` as an MPF input of at most ``max_length``."""
    sequences = {(r.source, r.patient_id): r.sequence for r in read_sequences(dataset, split)}
    wanted = {task.value for task in tasks}
    examples: list[TaskExample] = []
    for sample in read_samples(dataset).to_pylist():
        if sample["split"] != split or sample["task"] not in wanted:
            continue
        task = Task(sample["task"])
        whole = sequences[(sample["source"], sample["patient_id"])]
        window = truncate(whole.prefix(sample["cut_length"]), max_length - 1)
        prompted = with_task_token(window, vocab.id(task.token))
        if variant == "both_ends":
            prompted = _task_token_first(prompted, vocab.id(task.token))
        examples.append(
            TaskExample(
                sample["source"], sample["patient_id"], task, int(sample["label"]), prompted
            )
        )
    return examples


def task_batch(examples: Sequence[TaskExample]) -> TaskBatch:
    """Pad a list of examples into one batch."""
    inputs, lengths = collate([e.sequence for e in examples])
    order = list(Task)
    return TaskBatch(
        inputs=inputs,
        positions=lengths - 1,
        tasks=torch.tensor([order.index(e.task) for e in examples], dtype=torch.int64),
        labels=torch.tensor([float(e.label) for e in examples], dtype=torch.float32),
    )


def _task_token_first(seq: TokenSequence, task_token_id: int) -> TokenSequence:
    """The paper's MPF: the task token also stands where ``[CLS]`` was."""
    concept = seq.concept.copy()
    kinds = seq.type.copy()
    concept[0] = task_token_id
    kinds[0] = np.int8(TokenType.TASK)
    return replace(seq, concept=concept, type=kinds)
