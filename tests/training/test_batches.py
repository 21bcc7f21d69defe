"""Pretraining and MPF batches from a built dataset: targets, task tokens, labels, and a
few optimiser steps that lower the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fhir_adapter.tokenizer import truncate
from fhir_adapter.vocabulary import CLS, TokenType, Vocabulary
from model.config import ModelConfig
from model.network import EHRMamba
from model.tasks import Task
from training.batches import (
    IGNORE,
    next_token_batch,
    pretraining_sequences,
    task_batch,
    task_examples,
)
from training.dataset import read_samples, read_sequences

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def vocab(built: Path) -> Vocabulary:
    return Vocabulary.load(built / "vocab.json")


def test_next_token_targets_skip_padding_and_the_last_token(built: Path) -> None:
    sequences = sorted(pretraining_sequences(built, "pretrain", 400), key=len)[::10]
    assert len({len(s) for s in sequences}) > 1, "the batch must need padding"
    _, targets = next_token_batch(sequences)
    for row, seq in enumerate(sequences):
        n = len(seq)
        assert targets[row, : n - 1].tolist() == seq.concept[1:].tolist()
        assert (targets[row, n - 1 :] == IGNORE).all()
    assert int((targets != IGNORE).sum()) == sum(len(s) - 1 for s in sequences)
    assert all(len(s) <= 400 for s in sequences)


@pytest.mark.parametrize("variant", ["end", "both_ends"])
def test_mpf_inputs_end_with_their_task_token(built: Path, vocab: Vocabulary, variant: str) -> None:
    examples = task_examples(built, "pretrain", vocab, max_length=MAX_LENGTH, variant=variant)  # type: ignore[arg-type]
    samples = [s for s in read_samples(built).to_pylist() if s["split"] == "pretrain"]
    assert len(examples) == len(samples)
    assert {e.task for e in examples} >= {Task.MORTALITY, Task.HYPERTENSION}
    sequences = {r.patient_id: r.sequence for r in read_sequences(built, "pretrain")}
    labels = {(s["patient_id"], s["task"], s["cut_length"]): s["label"] for s in samples}
    for example in examples:
        seq = example.sequence
        assert len(seq) <= MAX_LENGTH
        assert seq.concept[-1] == vocab.id(example.task.token)
        assert seq.type[-1] == TokenType.TASK
        first = vocab.id(example.task.token) if variant == "both_ends" else vocab.id(CLS)
        assert seq.concept[0] == first
        matching = [
            label for (pid, task, _), label in labels.items()
            if pid == example.patient_id and task == example.task.value
        ]  # fmt: skip
        assert example.label in matching
    # The input before the task token is the prefix known at the cut, truncated.
    sample = next(s for s in samples if s["task"] == "mortality")
    example = next(
        e for e in examples if e.patient_id == sample["patient_id"] and e.task is Task.MORTALITY
    )
    known = sequences[sample["patient_id"]].prefix(sample["cut_length"])
    window = truncate(known, MAX_LENGTH - 1)
    if variant == "end":
        assert example.sequence.prefix(len(window)) == window


def test_task_batch_points_at_the_task_tokens(built: Path, vocab: Vocabulary) -> None:
    examples = task_examples(built, "pretrain", vocab, max_length=MAX_LENGTH)[:9]
    batch = task_batch(examples)
    for row, example in enumerate(examples):
        position = int(batch.positions[row])
        assert int(batch.inputs.concept[row, position]) == vocab.id(example.task.token)
        assert list(Task)[int(batch.tasks[row])] is example.task
        assert float(batch.labels[row]) == example.label


def test_a_few_mpf_steps_lower_the_loss(built: Path, vocab: Vocabulary) -> None:
    torch.manual_seed(0)
    examples = task_examples(built, "pretrain", vocab, max_length=MAX_LENGTH)[:24]
    batch = task_batch(examples)
    model = EHRMamba(ModelConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 dropout=0.0))  # fmt: skip
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        hidden, _, _ = model(batch.inputs)
        logits = model.task_logit(hidden[torch.arange(len(examples)), batch.positions])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
