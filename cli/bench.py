"""``ehrmamba bench``: measurements that back the numbers in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

app = typer.Typer(help="Benchmarks (tables, or JSON lines with --json).", no_args_is_help=True)

# Options several benchmarks share, declared once.
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
SharedData = Annotated[
    Path | None,
    typer.Option(help="The shared data folder (default: ../shared/data beside the repo)."),
]


def _shared(data: Path | None) -> Path:
    from bench import stack

    return data or stack.DEFAULT_DATA


@app.command()
def model(
    as_json: AsJson = False,
    size: Annotated[
        list[str] | None, typer.Option(help="compact and/or paper (default: both).")
    ] = None,
    quick: Annotated[bool, typer.Option(help="Short sequences, one run each.")] = False,
    case: Annotated[
        list[str] | None, typer.Option(help="forward, serving, training, floor (default: all).")
    ] = None,
) -> None:
    """Full forward, one-pass scoring, incremental update and step speed, side by side."""
    try:
        from bench import model_speed
    except ImportError as exc:  # transformers is a development dependency
        raise typer.BadParameter(
            f"{exc}; the comparison needs the dev extra: pip install -e '.[dev]'"
        ) from exc
    sizes = tuple(size or ("compact", "paper"))
    done = []
    cases = tuple(case or model_speed.CASES)
    unknown = set(cases) - set(model_speed.CASES)
    if unknown:
        raise typer.BadParameter(f"unknown case {sorted(unknown)}; use {model_speed.CASES}")
    for measurement in model_speed.run(sizes, quick=quick, cases=cases):
        done.append(measurement)
        if as_json:
            print(model_speed.as_json(measurement), flush=True)
    if not as_json:
        print(model_speed.table(done))


@app.command()
def service(
    patients: Annotated[
        int, typer.Option(min=2, help="Distinct patients; each one's first call is cold.")
    ] = 60,
    rounds: Annotated[int, typer.Option(min=1, help="Passes over them for the warm cases.")] = 3,
    data: SharedData = None,
    as_json: AsJson = False,
) -> None:
    """Predict and CDS Hooks latency over HTTP against real service and FHIR server
    processes, against the service's targets."""
    from bench import service_latency

    measurements = service_latency.run(_shared(data), patients, rounds)
    if as_json:
        for measurement in measurements:
            print(service_latency.as_json(measurement))
    else:
        print(service_latency.table(measurements))


@app.command()
def faithfulness(
    dataset: Annotated[
        Path,
        typer.Argument(help="A built dataset (`ehrmamba data build`), the model's vocabulary."),
    ],
    model: Annotated[Path, typer.Option(help="The model artifact.")] = Path("models/compact"),
    samples: Annotated[int, typer.Option(min=1, help="Test samples per task, at most.")] = 40,
    draws: Annotated[int, typer.Option(min=1, help="Random deletions per sample and k.")] = 5,
    steps: Annotated[int | None, typer.Option(min=1, help="Integration steps.")] = None,
    sweep: Annotated[
        bool, typer.Option(help="Instead: completeness gap and time against steps.")
    ] = False,
    length: Annotated[int, typer.Option(min=3, help="--sweep: window of the record.")] = 2048,
    task: Annotated[
        list[str] | None, typer.Option(help="--sweep: tasks (default: hypertension, mortality).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Integrated-gradients explanations: deleting the top-k attributed events against
    deleting k random ones, on the test split; or, with --sweep, steps against accuracy."""
    from bench import faithfulness as bench
    from model.explain import DEFAULT_STEPS
    from model.tasks import Task

    if sweep:
        tasks = [Task(t) for t in task or ("hypertension", "mortality")]
        rows = []
        for row in bench.steps_sweep(dataset, model, length=length, tasks=tasks):
            rows.append(row)
            if as_json:
                print(bench.as_json(row), flush=True)
        if not as_json:
            print(bench.steps_table(rows))
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as bar:  # fmt: skip
        shown: dict[str, TaskID] = {}

        def advance(task_name: str, done: int, total: int) -> None:
            if task_name not in shown:
                shown[task_name] = bar.add_task(f"explaining {task_name}", total=total)
            bar.update(shown[task_name], completed=done)

        run = bench.deletion(dataset, model, samples=samples, draws=draws,
                             steps=steps or DEFAULT_STEPS, progress=advance)  # fmt: skip
    if as_json:
        for deleted in run.rows:
            print(bench.as_json(deleted))
        print(bench.summary_json(run))
    else:
        print(bench.deletion_table(run))


@app.command("scan-versions")
def scan_versions(
    against: Annotated[str, typer.Option(help="The git revision whose model/scan.py to time.")],
    rounds: Annotated[int, typer.Option(min=2, help="Alternations (the first warms up).")] = 7,
) -> None:
    """The scan as it is now against another revision's, side by side in one process:
    a 2,048-token forward and a 4 x 1,024 training step, with the largest difference."""
    from bench import scan_versions as bench

    repo = Path(__file__).resolve().parents[1]
    try:
        comparisons = bench.run(against, repo, rounds=rounds)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    print(bench.table(comparisons))


@app.command("warm-path")
def warm_path(
    patients: Annotated[int, typer.Option(min=2, help="Shared patients to load.")] = 60,
    rounds: Annotated[int, typer.Option(min=1, help="Passes over them.")] = 3,
    data: SharedData = None,
) -> None:
    """The warm predict's FHIR check, record decoding and engine hit, old way beside new."""
    from bench import warm_path as bench

    measurements, others = bench.run(_shared(data), patients, rounds)
    print(bench.table(measurements, others))


@app.command("cache-memory")
def cache_memory(
    patients: Annotated[int, typer.Option(min=1, help="Shared patients to cache.")] = 60,
    data: SharedData = None,
) -> None:
    """Bytes the cache holds per patient: the record entry and the scan state entry."""
    from bench import cache_memory as bench

    print(bench.table(bench.run(_shared(data), patients)))


@app.command()
def throughput(
    connections: Annotated[
        list[int] | None, typer.Option(min=1, help="Concurrency levels (default: 1 4 16 64).")
    ] = None,
    seconds: Annotated[float, typer.Option(min=1, help="wrk's run at each level.")] = 20.0,
    warmup: Annotated[float, typer.Option(min=1, help="wrk warm-up before the levels, s.")] = 10.0,
    patients: Annotated[int, typer.Option(min=1, help="Shared patients to rotate over.")] = 60,
    workers: Annotated[int, typer.Option(min=1, help="ehrmamba serve --workers.")] = 1,
    timeout: Annotated[float, typer.Option(min=1, help="wrk's per-request timeout, s.")] = 30.0,
    data: SharedData = None,
    as_json: AsJson = False,
) -> None:
    """Predict requests per second and latency under wrk at rising concurrency, against
    real FHIR server, service and Redis processes (needs wrk: scripts/install-load-tools)."""
    from bench import stack, wrk
    from bench import throughput as bench

    try:
        wrk.require_wrk()
    except RuntimeError as exc:
        raise typer.BadParameter(str(exc)) from exc
    records = stack.load_records(_shared(data), patients)
    levels = bench.run(records, levels=tuple(connections or bench.LEVELS), seconds=seconds,
                       warmup_s=warmup, workers=workers, timeout_s=timeout)  # fmt: skip
    if as_json:
        for level in levels:
            print(bench.as_json(level))
    else:
        print(bench.table(levels))


@app.command()
def soak(
    minutes: Annotated[float, typer.Option(min=0.01, help="Length of the steady run.")] = 10.0,
    rate: Annotated[float, typer.Option(min=0.1, help="Open-loop requests per second.")] = 4.0,
    burst: Annotated[
        int, typer.Option(min=0, help="Overload probe afterwards: requests sent at once (0: none).")
    ] = 200,
    patients: Annotated[int, typer.Option(min=1, help="Shared patients to rotate over.")] = 60,
    workers: Annotated[int, typer.Option(min=1, help="ehrmamba serve --workers.")] = 1,
    timeout: Annotated[float, typer.Option(min=1, help="Client timeout per request, s.")] = 30.0,
    data: SharedData = None,
    as_json: AsJson = False,
) -> None:
    """A steady open-loop predict load for a bounded time: errors and latency per minute,
    the service's memory and open files every minute; then an overload burst."""
    from bench import soak as bench
    from bench import stack

    records = stack.load_records(_shared(data), patients)
    done = bench.run(records, minutes=minutes, rate=rate, workers=workers, timeout_s=timeout,
                     burst=burst)  # fmt: skip
    print(bench.as_json(done) if as_json else bench.report(done))
