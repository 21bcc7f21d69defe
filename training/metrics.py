"""Evaluation metrics, from probabilities (never from hard labels: DESIGN.md section 9).

Written in numpy so that training needs no scikit-learn; the tests hold every function
equal to scikit-learn's on fixed inputs (``roc_auc_score``, ``average_precision_score``,
``f1_score``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
Metric = Callable[[Array, Array], float]


def auroc(labels: Array, scores: Array) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (Mann-Whitney U with average ranks). NaN when one
    class is missing."""
    y = np.asarray(labels, dtype=np.float64)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def auprc(labels: Array, scores: Array) -> float:
    """Average precision: sum over distinct score thresholds of (recall gained) times the
    precision there, the step-wise area scikit-learn reports (no interpolation)."""
    y = np.asarray(labels, dtype=np.float64)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores, dtype=np.float64)[order], y[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    true_pos = np.cumsum(y)[last_of_threshold]
    predicted = last_of_threshold + 1
    precision = true_pos / predicted
    recall = true_pos / y.sum()
    gained = np.diff(np.r_[0.0, recall])
    return float((gained * precision).sum())


def f1_at(labels: Array, scores: Array, threshold: float) -> float:
    """F1 of calling ``score >= threshold`` positive."""
    y = np.asarray(labels) == 1
    called = np.asarray(scores) >= threshold
    tp = float((y & called).sum())
    denominator = float(y.sum() + called.sum())
    return 2 * tp / denominator if denominator else 0.0


def best_f1_threshold(labels: Array, scores: Array) -> float:
    """The threshold (one of the scores) with the highest F1; chosen on validation data and
    then applied to the test split. 0.5 when there are no positives to choose by."""
    if np.asarray(labels).sum() == 0:
        return 0.5
    candidates = np.unique(np.asarray(scores, dtype=np.float64))
    values = [f1_at(labels, scores, t) for t in candidates]
    return float(candidates[int(np.argmax(values))])


@dataclass(frozen=True)
class Reliability:
    """Per probability bin: mean predicted probability, observed positive rate, count."""

    predicted: list[float]
    observed: list[float]
    counts: list[int]
    ece: float


def reliability(labels: Array, scores: Array, bins: int = 10) -> Reliability:
    """Equal-width bins on [0, 1]; the expected calibration error is the count-weighted
    mean gap between predicted and observed rates."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    predicted, observed, counts = [], [], []
    ece = 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if not n:
            continue
        predicted.append(float(p[inside].mean()))
        observed.append(float(y[inside].mean()))
        counts.append(n)
        ece += n / len(y) * abs(predicted[-1] - observed[-1])
    return Reliability(predicted, observed, counts, float(ece))


def bootstrap_interval(
    labels: Array, scores: Array, metric: Metric, *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of ``metric`` over resamples of the samples (resamples that
    lose a class are skipped). Wide intervals are the honest answer when positives are few."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            values.append(metric(y[pick], p[pick]))
    if not values:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def recall_at_k(truth: npt.NDArray[np.int64], ranked: npt.NDArray[np.int64], k: int) -> float:
    """Share of rows whose true next token (truth (m,)) is among the first k of ranked (m, K)."""
    if len(truth) == 0:
        return float("nan")
    return float((ranked[:, :k] == truth[:, None]).any(axis=1).mean())


def _average_ranks(values: Array) -> Array:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks
