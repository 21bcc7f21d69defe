"""Cohort tables (the paper's Tables 2 and 3) from a dataset's ``cohort.json``."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from model.tasks import Task
from training.splits import SPLITS


def cohort_table(cohort: dict[str, Any]) -> Table:
    """Patients, visits and tokens per split; per task, samples and positive rate per split."""
    table = Table(title="cohort", show_lines=False)
    table.add_column("")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for key in ("patients", "visits", "tokens"):
        table.add_row(key, *(f"{cohort['splits'][s][key]:,}" for s in SPLITS))
    for task in _tasks(cohort):
        table.add_row(task, *(_short(cohort["tasks"][task][s]) for s in SPLITS))
    table.caption = "tasks: samples / positives (rate)"
    return table


def cohort_markdown(cohort: dict[str, Any]) -> str:
    """The same tables as Markdown, for docs/tasks.md."""
    head = "| | " + " | ".join(SPLITS) + " |\n|---|" + "---:|" * len(SPLITS) + "\n"
    rows = [
        f"| {key} | " + " | ".join(f"{cohort['splits'][s][key]:,}" for s in SPLITS) + " |"
        for key in ("patients", "visits", "tokens")
    ]
    tasks = [
        f"| {task} | " + " | ".join(_rate(cohort["tasks"][task][s]) for s in SPLITS) + " |"
        for task in _tasks(cohort)
    ]
    task_head = "| task: samples (patients), positives | " + " | ".join(SPLITS) + " |\n"
    task_head += "|---|" + "---:|" * len(SPLITS) + "\n"
    excluded = "| excluded (task:reason) | samples |\n|---|---:|\n" + "\n".join(
        f"| `{key}` | {count:,} |" for key, count in cohort["excluded"].items()
    )
    title = "Sources: " + ", ".join(f"`{s}`" for s in cohort["sources"])
    facts = (
        f"Vocabulary: {cohort['vocabulary_size']:,} tokens; lab bins fitted for "
        f"{cohort['lab_bins']:,} (code, unit) pairs."
    )
    return (
        "\n\n".join([title, head + "\n".join(rows), task_head + "\n".join(tasks), excluded, facts])
        + "\n"
    )


def _tasks(cohort: dict[str, Any]) -> list[str]:
    """Task names in the documented order (cohort.json sorts its keys)."""
    return [task.value for task in Task if task.value in cohort["tasks"]]


def _short(cell: dict[str, int]) -> str:
    n, positives = cell["n"], cell["positives"]
    return f"{n:,} / {positives:,} ({100 * positives / n:.1f} %)" if n else "0"


def _rate(cell: dict[str, int]) -> str:
    n, positives = cell["n"], cell["positives"]
    share = f"{100 * positives / n:.1f} %" if n else "-"
    return f"{n:,} ({cell['patients']:,}), {positives:,} = {share}"
