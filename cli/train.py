"""``ehrmamba train``: from a built dataset (``ehrmamba data build``) to a served artifact,
its baselines and its results page."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from model.config import SIZES
from training.evaluation import METHODS
from training.pipeline import PipelineConfig, run

app = typer.Typer(help="Train, evaluate against baselines and export.")


@app.command()
def train(
    dataset: Annotated[Path, typer.Argument(help="A folder written by `ehrmamba data build`.")],
    out: Annotated[Path, typer.Option(help="Artifact folder to create (must be empty).")],
    work: Annotated[
        Path, typer.Option(help="Checkpoints and predictions; a rerun resumes from here.")
    ] = Path("runs/train"),
    report: Annotated[
        Path | None, typer.Option(help="Write results.md and plots into this folder.")
    ] = None,
    size: Annotated[str, typer.Option(help=f"Model size: {', '.join(SIZES)}.")] = "compact",
    seeds: Annotated[int, typer.Option(min=1, help="Finetuning seeds (0, 1, ...).")] = 3,
    method: Annotated[
        list[str] | None, typer.Option(help=f"Methods to run (default all: {', '.join(METHODS)}).")
    ] = None,
    max_length: Annotated[int, typer.Option(min=16, help="Window in tokens.")] = 1024,
    pretrain_epochs: Annotated[int, typer.Option(min=1)] = 4,
    finetune_epochs: Annotated[int, typer.Option(min=1)] = 6,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    version: Annotated[str, typer.Option(help="Artifact version.")] = "0.1.0",
    hidden_size: Annotated[int | None, typer.Option(help="Override the size's width.")] = None,
    layers: Annotated[int | None, typer.Option(help="Override the size's depth.")] = None,
) -> None:
    """Pretrain, finetune (MPF and baselines), evaluate, export. Under `torchrun` the
    training runs data-parallel across processes."""
    if not (dataset / "vocab.json").is_file():
        raise typer.BadParameter(f"{dataset} is not a built dataset (no vocab.json)")
    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} is not empty")
    methods = tuple(method or METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown or "ehrmamba_mpf" not in methods:
        raise typer.BadParameter(f"methods must include ehrmamba_mpf and be among {METHODS}")
    defaults = PipelineConfig(dataset=dataset, out=out, work=work)
    overrides = {
        k: v
        for k, v in (("hidden_size", hidden_size), ("num_hidden_layers", layers))
        if v is not None
    }
    config = replace(
        defaults,
        report=report,
        size=size,
        model_overrides=overrides,
        max_length=max_length,
        seeds=tuple(range(seeds)),
        methods=methods,
        pretrain=replace(defaults.pretrain, epochs=pretrain_epochs, device=device),
        finetune=replace(defaults.finetune, epochs=finetune_epochs, device=device),
        version=version,
        command=shlex.join(["ehrmamba", *sys.argv[1:]]),
        show_progress=sys.stderr.isatty(),
    )
    run(config, say=lambda line: typer.echo(line, err=True))
