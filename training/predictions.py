"""Scores for every sample of a set of windows, from a trained EHRMamba or from XGBoost, as
plain records that evaluation, thresholds and reports share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from fhir_adapter.tokenizer import TokenSequence
from fhir_adapter.vocabulary import Vocabulary
from model.batching import collate
from model.network import EHRMamba
from training.batches import TaskWindow, by_length, window_batch
from training.objectives import PromptedLogits


@dataclass(frozen=True)
class Prediction:
    """One scored sample."""

    source: int
    patient_id: str
    task: str
    visit_id: str
    label: int
    probability: float


def save_predictions(path: Path, predictions: Sequence[Prediction]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(asdict(p)) for p in predictions) + "\n")


def load_predictions(path: Path) -> list[Prediction]:
    return [Prediction(**json.loads(line)) for line in path.read_text().splitlines() if line]


@torch.no_grad()
def predict_windows(
    model: EHRMamba, windows: Sequence[TaskWindow], vocab: Vocabulary, batch_tokens: int = 16384
) -> list[Prediction]:
    """Every prompt's probability, in window order (model in eval mode, no dropout)."""
    model.eval()
    scorer = PromptedLogits(model)
    out: list[Prediction] = []
    lengths = [len(w.sequence) for w in windows]
    for indices in sorted(by_length(lengths, batch_tokens, None)):
        chosen = [windows[i] for i in indices]
        probabilities = torch.sigmoid(scorer(window_batch(chosen, vocab))).tolist()
        prompts = [(w, p) for w in chosen for p in w.prompts]
        for (window, prompt), probability in zip(prompts, probabilities, strict=True):
            out.append(
                Prediction(
                    window.source,
                    window.patient_id,
                    prompt.task.value,
                    prompt.visit_id,
                    prompt.label,
                    float(probability),
                )
            )
    return out


def count_features(
    windows: Sequence[TaskWindow], vocab_size: int
) -> tuple[npt.NDArray[np.float32], list[Prediction]]:
    """The paper's XGBoost inputs: per sample, how often each token occurs in its input,
    plus the first and last age (years). Returns (samples, vocabulary + 2) and the samples'
    records (probability 0 until scored)."""
    rows: list[npt.NDArray[np.float32]] = []
    records: list[Prediction] = []
    for window in windows:
        for prompt in window.prompts:
            seen = window.sequence.concept[: prompt.position + 1]
            counts = np.bincount(seen, minlength=vocab_size).astype(np.float32)
            ages = window.sequence.age[[0, prompt.position]].astype(np.float32)
            rows.append(np.concatenate([counts, ages]))
            records.append(
                Prediction(
                    window.source,
                    window.patient_id,
                    prompt.task.value,
                    prompt.visit_id,
                    prompt.label,
                    0.0,
                )
            )
    width = vocab_size + 2
    return (np.stack(rows) if rows else np.zeros((0, width), np.float32)), records


@torch.no_grad()
def next_event_ranks(
    model: EHRMamba,
    sequences: Sequence[TokenSequence],
    vocab: Vocabulary,
    k: int = 10,
    batch_tokens: int = 16384,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For every position whose next token is an event (a code, not a structural token),
    the true next token (m,) and the model's top-k event tokens there (m, k): what
    forecasting recall@k is computed from."""
    model.eval()
    first_code = vocab.first_code_id
    truths: list[npt.NDArray[np.int64]] = []
    ranked: list[npt.NDArray[np.int64]] = []
    for indices in by_length([len(s) for s in sequences], batch_tokens, None):
        batch, lengths = collate([sequences[i] for i in indices])
        hidden, _, _ = model(batch)
        logits = model.next_token_logits(hidden)[..., first_code:]  # events only
        for row, n in enumerate(lengths.tolist()):
            following = batch.concept[row, 1:n]
            wanted = following >= first_code
            if not bool(wanted.any()):
                continue
            top = logits[row, : n - 1][wanted].topk(min(k, logits.shape[-1]), dim=-1).indices
            truths.append(following[wanted].numpy())
            ranked.append((top + first_code).numpy())
    if not truths:
        return np.zeros(0, np.int64), np.zeros((0, k), np.int64)
    return np.concatenate(truths), np.concatenate(ranked)
