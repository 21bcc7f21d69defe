"""Pretraining and MPF batches from a built dataset: targets, windows and their prompts,
branching equal to separate passes (values and gradients), and a few optimiser steps that
lower the loss."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fhir_adapter.tokenizer import with_task_token
from fhir_adapter.vocabulary import CLS, Vocabulary
from model import scan
from model.config import ModelConfig
from model.network import STREAMS, EHRMamba, TokenBatch
from model.tasks import Task
from training.batches import (
    IGNORE,
    TaskWindow,
    by_length,
    next_token_batch,
    pretraining_sequences,
    task_windows,
    window_batch,
)
from training.dataset import read_samples, read_sequences
from training.objectives import PromptedLogits

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


def _samples(built: Path, split: str) -> list[dict[str, object]]:
    return [s for s in read_samples(built).to_pylist() if s["split"] == split]


@pytest.mark.parametrize("variant", ["end", "both_ends"])
@pytest.mark.parametrize("max_length", [MAX_LENGTH, 4096], ids=["truncating", "whole"])
def test_windows_hold_every_sample_once_at_its_cut(
    built: Path, vocab: Vocabulary, variant: str, max_length: int
) -> None:
    windows = task_windows(built, "pretrain", vocab, max_length=max_length, variant=variant)  # type: ignore[arg-type]
    samples = _samples(built, "pretrain")
    prompts = [(w.patient_id, p.task.value, p.label) for w in windows for p in w.prompts]
    assert sorted(prompts) == sorted((s["patient_id"], s["task"], s["label"]) for s in samples)
    sequences = {r.patient_id: r.sequence for r in read_sequences(built, "pretrain")}
    cuts = {(s["patient_id"], s["task"], s["visit_id"] or ""): s["cut_length"] for s in samples}
    for window in windows:
        assert len(window.sequence) <= max_length - 1
        if variant == "both_ends":
            assert len({p.task for p in window.prompts}) == 1
            assert window.sequence.concept[0] == vocab.id(window.prompts[0].task.token)
        else:
            assert window.sequence.concept[0] == vocab.id(CLS)
        whole = sequences[window.patient_id]
        for prompt in window.prompts:
            cut = int(cuts[(window.patient_id, prompt.task.value, prompt.visit_id)])  # type: ignore[call-overload]
            seen = window.sequence.prefix(prompt.position + 1)
            # The last tokens before the task token are the last tokens known at the cut.
            tail = min(len(seen) - 2, cut)
            if tail > 0:
                assert seen.concept[-tail:].tolist() == whole.concept[cut - tail : cut].tolist()
            if max_length > len(whole):
                assert seen.concept[1:].tolist() == whole.prefix(cut).concept[1:].tolist()
    if max_length == MAX_LENGTH:
        assert any(w.sequence.truncated for w in windows), "the case must truncate"


def test_a_patient_with_many_samples_is_scanned_once(built: Path, vocab: Vocabulary) -> None:
    windows = task_windows(built, "pretrain", vocab, max_length=4096)
    assert len({w.patient_id for w in windows}) == len(windows)
    assert max(len(w.prompts) for w in windows) > 3


def _double(batch: TokenBatch) -> TokenBatch:
    fields = {k: getattr(batch, k) for k in STREAMS}
    return TokenBatch(**{k: v.double() if v.is_floating_point() else v for k, v in fields.items()})


def _logits(
    model: EHRMamba, windows: list[TaskWindow], vocab: Vocabulary, wide: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Branched logits, separate-pass logits (each prompt's input plus its task token, read at
    the last position) and the labels."""
    cast = _double if wide else (lambda b: b)
    batch = window_batch(windows, vocab)
    batch = replace(batch, inputs=cast(batch.inputs), task_tokens=cast(batch.task_tokens))
    separate = []
    for window in windows:
        for prompt in window.prompts:
            seen = window.sequence.prefix(prompt.position + 1)
            hidden, _, _ = model(
                cast(next_token_batch([with_task_token(seen, vocab.id(prompt.task.token))])[0])
            )
            separate.append(model.task_logit(hidden[0, -1], torch.tensor(prompt.task.column)))
    labels = batch.labels.double() if wide else batch.labels
    return PromptedLogits(model)(batch), torch.stack(separate), labels


def test_branching_equals_separate_passes_values_and_gradients(
    built: Path, vocab: Vocabulary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training by branching from captured states is exactly training on each prompted
    input separately: checked in float64 through the reference scan (gradients included),
    and in float32 through the compiled scan (values), on windows where several prompts
    share a cut (the compiled scan once gave all but one of them a zero state)."""
    torch.manual_seed(0)
    model = EHRMamba(ModelConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 dropout=0.0))  # fmt: skip
    with torch.no_grad():  # a state that weighs more than at initialisation: it must matter
        for block in model.backbone.blocks():
            block.mixer.x_proj.weight.mul_(10.0)
    every = task_windows(built, "pretrain", vocab, max_length=200)
    shared = [w for w in every if len({p.position for p in w.prompts}) < len(w.prompts)]
    assert len(shared) >= 2, "the check needs windows whose prompts share a cut"
    windows = shared[:2] + [w for w in every if w not in shared][:3]
    branched, separate, _ = _logits(model, windows, vocab, wide=False)
    assert (branched - separate).abs().max().item() < 5e-4  # float32 over 200-step scans
    monkeypatch.setattr(scan, "compiled_scan", scan.reference_scan)
    model = model.double()
    branched, separate, labels = _logits(model, windows[:3], vocab, wide=True)
    assert (branched - separate).abs().max().item() < 1e-10
    grads = []
    for logits in (branched, separate):
        model.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        error = (grads[0][name] - grads[1][name]).abs().max().item()
        assert error <= 1e-7 * grads[1][name].abs().max().item() + 1e-15, name


def test_window_batch_lays_out_prompts(built: Path, vocab: Vocabulary) -> None:
    windows = task_windows(built, "pretrain", vocab, max_length=MAX_LENGTH)[:6]
    batch = window_batch(windows, vocab)
    flat = [(row, slot, p) for row, w in enumerate(windows) for slot, p in enumerate(w.prompts)]
    assert batch.labels.tolist() == [float(p.label) for _, _, p in flat]
    for i, (row, slot, prompt) in enumerate(flat):
        assert (int(batch.rows[i]), int(batch.slots[i])) == (row, slot)
        assert int(batch.capture[row, slot]) == prompt.position
        assert int(batch.task_tokens.concept[i, 0]) == vocab.id(prompt.task.token)
        assert list(Task)[int(batch.tasks[i])] is prompt.task


def test_length_batches_respect_the_token_budget() -> None:
    lengths = [5, 50, 7, 300, 6, 49, 1000]
    batches = by_length(lengths, 120, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for group in batches:
        assert len(group) == 1 or max(lengths[i] for i in group) * len(group) <= 120
    assert by_length(lengths, 120, seed=1) == batches
    assert by_length(lengths, 120, seed=2) != batches or len(batches) < 3


def test_a_few_mpf_steps_lower_the_loss(built: Path, vocab: Vocabulary) -> None:
    torch.manual_seed(0)
    windows = task_windows(built, "pretrain", vocab, max_length=MAX_LENGTH)[:12]
    batch = window_batch(windows, vocab)
    model = EHRMamba(ModelConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                 dropout=0.0))  # fmt: skip
    scorer = PromptedLogits(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scorer(batch), batch.labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
