"""``ehrmamba bench``: measurements that back the numbers in docs/benchmarks.md."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks (tables, or JSON lines with --json).", no_args_is_help=True)


@app.command()
def model(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
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
