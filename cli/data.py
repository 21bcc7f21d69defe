"""``ehrmamba data``: look at FHIR sources the way the model will read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline
from fhir_adapter.summary import SourceSummary, summarize
from model.artifact import attach_displays, load_artifact
from training.dataset import BuildConfig, build_dataset, code_displays
from training.report import cohort_markdown, cohort_table

app = typer.Typer(help="Inspect FHIR export files and bundles.", no_args_is_help=True)


@app.command()
def inspect(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Export folders, NDJSON files, bundle folders or tar archives."),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per source on stdout.")
    ] = False,
) -> None:
    """Count patients, visits by class, events by kind, conditions and drops per source."""
    err = Console(stderr=True)
    out = Console()
    missing = [p for p in paths if not p.exists()]
    if missing:
        err.print(f"[red]not found:[/red] {', '.join(map(str, missing))}")
        raise typer.Exit(2)
    for path in paths:
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.completed} patients"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task(f"reading {path}", total=None)

            def advance(done: int, task: TaskID = task) -> None:
                progress.update(task, completed=done)

            summary = summarize(path, advance)
        if as_json:
            print(json.dumps(summary.to_json(), sort_keys=True), flush=True)
        else:
            out.print(_table(summary))


@app.command()
def build(
    sources: Annotated[
        list[Path], typer.Argument(help="FHIR sources: export folders, NDJSON, bundles, tars.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Dataset folder (created; resumable).")],
    min_count: Annotated[int, typer.Option(help="Keep codes seen this often in training.")] = 5,
    workers: Annotated[int, typer.Option(help="Processes; each takes a patient partition.")] = 2,
) -> None:
    """Build token datasets and task labels: splits, lab bins, vocabulary, Parquet files."""
    missing = [p for p in sources if not p.exists()]
    if missing:
        Console(stderr=True).print(f"[red]not found:[/red] {', '.join(map(str, missing))}")
        raise typer.Exit(2)
    config = BuildConfig(sources=tuple(sources), out=out, min_count=min_count, workers=workers)
    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        bars: dict[str, TaskID] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done)

        cohort = build_dataset(config, advance)
    Console(width=max(Console().width, 120)).print(cohort_table(cohort))


@app.command()
def displays(
    sources: Annotated[list[Path], typer.Argument(help="FHIR sources the model was trained on.")],
    artifact: Annotated[Path, typer.Option(help="The artifact folder to add them to.")],
) -> None:
    """Add how the sources name each code (their codings' display) to an artifact, so
    forecasts and explanations read as words; the weights are not touched."""
    timelines = (
        build_timeline(record) for source in sources for record in ExportReader(source).records()
    )
    names = code_displays(timelines, load_artifact(artifact).vocab)
    digest = attach_displays(artifact, names)
    Console().print(f"{len(names)} display names added to {artifact}; sha256 {digest}")


@app.command()
def report(
    datasets: Annotated[list[Path], typer.Argument(help="Dataset folders made by `build`.")],
) -> None:
    """Print each dataset's cohort tables (splits, tasks, exclusions) as Markdown."""
    for folder in datasets:
        path = folder / "cohort.json"
        if not path.is_file():
            Console(stderr=True).print(f"[red]no cohort.json in[/red] {folder}")
            raise typer.Exit(2)
        print(cohort_markdown(json.loads(path.read_text())))


def _table(summary: SourceSummary) -> Table:
    table = Table(
        title=summary.source, caption=f"read in {summary.seconds:.1f} s", show_header=False
    )
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    table.add_row("patients", f"{summary.patients:,}")
    for title, counter in (
        ("visits", summary.visits),
        ("events", summary.events),
        ("resources read", summary.resources),
        ("dropped", summary.dropped),
        ("skipped types", summary.skipped_types),
    ):
        table.add_row(title, f"{sum(counter.values()):,}")
        for key in sorted(counter):
            table.add_row(f"  {key}", f"{counter[key]:,}")
    table.add_row("conditions", f"{summary.conditions:,}")
    return table
