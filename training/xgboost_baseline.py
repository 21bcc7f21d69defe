"""The paper's baseline: gradient-boosted trees on token counts plus first and last age, one
model per task, early-stopped on the same validation patients as EHRMamba."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import xgboost as xgb

from model.tasks import Task
from training.batches import TaskWindow
from training.predictions import Prediction, count_features


def xgboost_predictions(
    train: Sequence[TaskWindow],
    validation: Sequence[TaskWindow],
    evaluate: dict[str, Sequence[TaskWindow]],
    tasks: Sequence[Task],
    vocab_size: int,
    seed: int,
) -> dict[str, list[Prediction]]:
    """Fit one classifier per task; score every set in ``evaluate`` (name -> windows).
    Subsampling rows and columns makes seeds differ, as training seeds do for EHRMamba."""
    x_train, r_train = count_features(train, vocab_size)
    x_val, r_val = count_features(validation, vocab_size)
    scored = {name: count_features(windows, vocab_size) for name, windows in evaluate.items()}
    out: dict[str, list[Prediction]] = {name: [] for name in evaluate}
    for task in tasks:
        fit_rows = [i for i, r in enumerate(r_train) if r.task == task.value]
        val_rows = [i for i, r in enumerate(r_val) if r.task == task.value]
        labels = np.array([r_train[i].label for i in fit_rows])
        model = xgb.XGBClassifier(
            n_estimators=400,
            learning_rate=0.05,
            max_depth=4,
            subsample=0.8,
            colsample_bytree=0.8,
            random_state=seed,
            n_jobs=2,
            eval_metric="logloss",
            early_stopping_rounds=30 if val_rows else None,
        )
        evals = (
            [(x_val[val_rows], np.array([r_val[i].label for i in val_rows]))] if val_rows else None
        )
        model.fit(x_train[fit_rows], labels, eval_set=evals, verbose=False)
        for name, (x, records) in scored.items():
            rows = [i for i, r in enumerate(records) if r.task == task.value]
            if not rows:
                continue
            probabilities = model.predict_proba(x[rows])[:, 1]
            out[name].extend(
                replace(records[i], probability=float(p))
                for i, p in zip(rows, probabilities, strict=True)
            )
    return out
