"""From saved predictions to the numbers of the results table: per method, task and test
subset, AUROC, AUPRC, F1 at the validation-chosen threshold and calibration error, as mean
and standard deviation over seeds, with bootstrap intervals where positives are few."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model.tasks import Task
from training.metrics import (
    auprc,
    auroc,
    best_f1_threshold,
    bootstrap_interval,
    f1_at,
    reliability,
)
from training.predictions import Prediction

FEW_POSITIVES = 30  # below this many test positives, report bootstrap intervals
# method -> seed -> (validation, test) predictions
Runs = dict[str, dict[int, tuple[list[Prediction], list[Prediction]]]]
METHODS = ("ehrmamba_mpf", "ehrmamba_per_task", "ehrmamba_mpf_both_ends", "xgboost")


def arrays(predictions: Sequence[Prediction]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([p.label for p in predictions], dtype=np.float64),
        np.array([p.probability for p in predictions], dtype=np.float64),
    )


def score_run(
    validation: Sequence[Prediction], test: Sequence[Prediction], task: Task
) -> dict[str, float]:
    """One seed of one method on one task (test restricted to the subset by the caller)."""
    val_y, val_p = arrays([p for p in validation if p.task == task.value])
    y, p = arrays([q for q in test if q.task == task.value])
    threshold = best_f1_threshold(val_y, val_p)
    return {
        "auroc": auroc(y, p),
        "auprc": auprc(y, p),
        "f1": f1_at(y, p, threshold),
        "threshold": threshold,
        "ece": reliability(y, p).ece if len(y) else float("nan"),
    }


def summarise(
    runs: Mapping[str, Mapping[int, tuple[list[Prediction], list[Prediction]]]],
    tasks: Sequence[Task],
    subsets: Mapping[str, int | None],
) -> dict[str, Any]:
    """``runs``: method -> seed -> (validation, test) predictions. ``subsets``: name ->
    source index (None: every source). Returns subset -> task -> {n, positives, methods}."""
    out: dict[str, Any] = {}
    for subset, source in subsets.items():
        per_task: dict[str, Any] = {}
        for task in tasks:
            entry: dict[str, Any] = {"methods": {}}
            for method, seeds in runs.items():
                scores = []
                for _seed, (validation, test) in sorted(seeds.items()):
                    chosen = [p for p in test if source is None or p.source == source]
                    scores.append(score_run(validation, chosen, task))
                    y, _ = arrays([p for p in chosen if p.task == task.value])
                    entry["n"], entry["positives"] = len(y), int(y.sum())
                if not scores:
                    continue
                summary: dict[str, Any] = {
                    name: {
                        "mean": _mean([s[name] for s in scores]),
                        "sd": _sd([s[name] for s in scores]),
                    }
                    for name in ("auroc", "auprc", "f1", "ece")
                }
                summary["seeds"] = len(scores)
                first_test = sorted(seeds.items())[0][1][1]
                y, p = arrays(
                    [
                        q
                        for q in first_test
                        if q.task == task.value and (source is None or q.source == source)
                    ]
                )
                if 0 < y.sum() < FEW_POSITIVES and y.sum() < len(y):
                    summary["auroc_ci95_first_seed"] = bootstrap_interval(y, p, auroc)
                entry["methods"][method] = summary
            per_task[task.value] = entry
        out[subset] = per_task
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _sd(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else (0.0 if finite else None)
