"""Which tokens XGBoost leans on per task, and how pure a label each one is: the evidence
behind "why MPF trails XGBoost" in docs/results.md.

    .venv/bin/python scripts/xgboost_top_features.py data/synthea-clinosim \\
        hypertension lipid_metabolism
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xgboost as xgb

from fhir_adapter.vocabulary import Vocabulary
from model.tasks import Task
from training.batches import task_windows
from training.predictions import count_features


def main(dataset: Path, tasks: list[str]) -> None:
    vocab = Vocabulary.load(dataset / "vocab.json")
    names = [vocab.token(i) for i in range(len(vocab))] + ["first_age", "last_age"]
    for task in (Task(t) for t in tasks):
        windows = task_windows(dataset, "finetune", vocab, max_length=1024, tasks=[task],
                               validation=False)  # fmt: skip
        x, records = count_features(windows, len(vocab))
        y = np.array([r.label for r in records])
        model = xgb.XGBClassifier(n_estimators=200, max_depth=4, n_jobs=1).fit(x, y)
        print(f"{task.value}: {len(y)} training samples, {int(y.sum())} positive")
        for i in np.argsort(-model.feature_importances_)[:5]:
            has = x[:, i] > 0
            purity = (
                f"P(label | present) {y[has].mean():.2f} in {int(has.sum())}" if has.any() else ""
            )
            print(f"  {names[i]:<24} importance {model.feature_importances_[i]:.3f}  {purity}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
