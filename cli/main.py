"""``ehrmamba``: subcommands are added here as the parts they drive land."""

from __future__ import annotations

import typer

from cli import bench, data, demo, serve, train

app = typer.Typer(
    name="ehrmamba",
    help="EHRMamba over FHIR: read data, train, evaluate, export and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold credentials
)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.add_typer(train.app)
app.add_typer(serve.app)
app.add_typer(demo.app, name="demo")
