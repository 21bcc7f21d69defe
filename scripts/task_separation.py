"""How much the served model's task token changes its answer: for shared patients scored at
the end of their record, the spread between the largest and smallest of the four
end-of-record task probabilities, each task's mean, and the correlation between tasks.
A model that learned the tasks apart has wide spreads and per-task means near each task's
base rate; one that learned a single severity score has spreads near zero.

Usage: .venv/bin/python scripts/task_separation.py [--patients 150] SOURCE...
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline
from model.artifact import load_artifact
from model.tasks import Task
from service.scoring import Scorer

TASKS = (Task.MORTALITY, Task.READMISSION, Task.HYPERTENSION, Task.LIPID_METABOLISM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--model", type=Path, default=Path("models/compact"))
    args = parser.parse_args()
    scorer = Scorer(load_artifact(args.model))
    print(
        "| source | patients | median spread | p90 spread | mean p: "
        + " / ".join(t.value for t in TASKS)
        + " | corr(mortality, hypertension) |"
    )
    print("|---|---:|---:|---:|---|---:|")
    for source in args.sources:
        rows = []
        for record in ExportReader(source).records():
            timeline = build_timeline(record)
            if len(timeline.events) < 5 or timeline.patient.birth_date is None:
                continue
            scored = scorer.score(timeline, TASKS, 0, datetime.now(UTC))
            rows.append([scored.probabilities[t] for t in TASKS])
            if len(rows) >= args.patients:
                break
        p = np.array(rows)
        spread = p.max(axis=1) - p.min(axis=1)
        means = " / ".join(f"{m:.3f}" for m in p.mean(axis=0))
        corr = np.corrcoef(p[:, 0], p[:, 2])[0, 1]
        print(
            f"| {source.name} | {len(p)} | {np.median(spread):.3f} | "
            f"{np.quantile(spread, 0.9):.3f} | {means} | {corr:.3f} |"
        )


if __name__ == "__main__":
    main()
