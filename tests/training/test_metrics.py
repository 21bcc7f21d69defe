"""Our metrics against scikit-learn's on fixed inputs, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from training.metrics import (
    auprc,
    auroc,
    best_f1_threshold,
    bootstrap_interval,
    f1_at,
    recall_at_k,
    reliability,
)


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    cases = []
    for n, rate in ((50, 0.3), (200, 0.05), (31, 0.5)):
        y = (rng.random(n) < rate).astype(float)
        y[0], y[1] = 1.0, 0.0  # both classes
        p = np.clip(rng.random(n) * 0.6 + y * 0.3, 0, 1)
        cases.append((y, p))
        cases.append((y, np.round(p, 1)))  # many ties
    return cases


@pytest.mark.parametrize("case", range(6))
def test_auroc_and_auprc_equal_scikit_learn(case: int) -> None:
    y, p = _cases()[case]
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


@pytest.mark.parametrize("case", range(6))
def test_f1_at_a_threshold_equals_scikit_learn(case: int) -> None:
    y, p = _cases()[case]
    for threshold in (0.2, 0.5, 0.7):
        assert f1_at(y, p, threshold) == pytest.approx(
            f1_score(y, (p >= threshold).astype(float), zero_division=0.0), abs=1e-12
        )
    best = best_f1_threshold(y, p)
    assert f1_at(y, p, best) >= max(f1_at(y, p, t) for t in np.linspace(0, 1, 101)) - 1e-12


def test_undefined_cases_are_nan_not_a_number_that_looks_real() -> None:
    y = np.zeros(5)
    p = np.linspace(0, 1, 5)
    assert np.isnan(auroc(y, p))
    assert np.isnan(auprc(y, p))
    assert np.isnan(auroc(np.ones(5), p))


def test_reliability_bins_and_expected_calibration_error() -> None:
    y = np.array([0, 0, 1, 1, 1, 0], dtype=float)
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.92, 0.88])
    curve = reliability(y, p, bins=10)
    assert curve.counts == [1, 1, 2, 2]
    assert curve.observed == [0.0, 0.0, 0.5, 1.0]
    expected = (0.05 + 0.15 + 2 * abs(0.865 - 0.5) + 2 * abs(0.935 - 1.0)) / 6
    assert curve.ece == pytest.approx(expected)


def test_bootstrap_interval_brackets_the_estimate() -> None:
    y, p = _cases()[0]
    low, high = bootstrap_interval(y, p, auroc, resamples=300, seed=1)
    assert low < auroc(y, p) < high
    assert bootstrap_interval(y, p, auroc, resamples=300, seed=1) == (low, high)


def test_recall_at_k() -> None:
    truth = np.array([5, 6, 7])
    ranked = np.array([[5, 1, 2], [1, 6, 2], [1, 2, 3]])
    assert recall_at_k(truth, ranked, 1) == pytest.approx(1 / 3)
    assert recall_at_k(truth, ranked, 2) == pytest.approx(2 / 3)
    assert recall_at_k(truth, ranked, 3) == pytest.approx(2 / 3)
