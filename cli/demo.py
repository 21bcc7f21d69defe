"""``ehrmamba demo``: the whole service on this machine with nothing to configure.

A local FHIR server holds synthetic patients (``cli/demo_samples.py``), the service reads
them with the committed model, an SQLite store and the in-process cache, and trusts one
CDS client, the demo's EHR (``cli/demo_ehr.py``). Everything it keeps lives in
``.cache/demo``. While it runs, ``.cache/demo/run-<port>.json`` tells ``ehrmamba demo
hook`` where the service and the FHIR server are, since the latter's port is picked free.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import socket
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import httpx
import typer
import uvicorn

from cli.demo_ehr import call_patient_view, ehr_issuer, ehr_key
from cli.demo_samples import Samples, ensure_fhir_data, ensure_samples, sample_server
from fhir_adapter.local_server import ROOT, install_fhir_server
from service.app import create_app
from service.settings import Settings

CACHE = ROOT / ".cache" / "demo"
MODEL = ROOT / "models" / "compact"
HOST = "127.0.0.1"
DEFAULT_PORT = 8000
READY = "EHRMamba demo ready"

Port = Annotated[int, typer.Option(min=1, max=65535, help="The service's port.")]

app = typer.Typer()


@app.callback(invoke_without_command=True)
def demo(ctx: typer.Context, port: Port = DEFAULT_PORT) -> None:
    """Run the service on sample patients, nothing to configure; Ctrl-C stops it."""
    if ctx.invoked_subcommand is None:
        _run(port)


@app.command()
def hook(
    patient: Annotated[str, typer.Option(help="A sample patient's id.")],
    port: Port = DEFAULT_PORT,
) -> None:
    """Play the EHR: call patient-view with a freshly signed JWT and print the cards."""
    run_file = _run_file(port)
    if not run_file.is_file():
        typer.echo(f"No demo runs on port {port}; start one with `ehrmamba demo`.", err=True)
        raise typer.Exit(2)
    where = json.loads(run_file.read_text())
    try:
        answer = call_patient_view(where["service"], where["fhir_server"], ehr_key(CACHE), patient)
    except httpx.TransportError as exc:
        typer.echo(f"The demo on port {port} does not answer ({exc}).", err=True)
        raise typer.Exit(2) from exc
    if answer.status_code != 200:
        typer.echo(f"HTTP {answer.status_code}: {answer.text}", err=True)
        raise typer.Exit(1)
    cards = answer.json()["cards"]
    for card in cards:
        typer.echo(f"[{card['indicator']}] {card['summary']}")
        typer.echo(textwrap.indent(card["detail"], "    "))
    if not cards:
        typer.echo("No cards: every risk is low for this patient.")


def _run(port: int) -> None:
    listener = _listen(port)  # before minutes of setup, not after
    samples = ensure_samples(CACHE, typer.echo)
    sekmet = install_fhir_server()
    data = ensure_fhir_data(CACHE, samples, sekmet, typer.echo)
    issuer = ehr_issuer(CACHE)
    # A terminal closing or a supervisor stopping the demo cleans up as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run_file = _run_file(port)
    with listener, sample_server(data, sekmet) as fhir:
        settings = Settings(
            model_path=MODEL,
            fhir_base_url=fhir.base_url,
            fhir_token=None,
            public_url=None,
            database_url=f"sqlite:///{CACHE / 'ehrmamba.db'}",
            redis_url=None,
            api_keys=[],
            cds_issuers=[issuer],
            cds_require_jwt=True,
            fhir_server_allow=[fhir.base_url],
        )
        run_file.write_text(json.dumps({"service": _url(port), "fhir_server": fhir.base_url}))
        try:
            problem = asyncio.run(_serve(settings, listener, samples, port))
        except KeyboardInterrupt:
            problem = None
        finally:
            run_file.unlink(missing_ok=True)
    if problem is not None:
        typer.echo(f"The service is not ready: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo("Stopped.")


def _url(port: int) -> str:
    return f"http://{HOST}:{port}"


def _run_file(port: int) -> Path:
    return CACHE / f"run-{port}.json"


def _listen(port: int) -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((HOST, port))
    except OSError as exc:
        listener.close()
        typer.echo(f"Port {port} is not free ({exc.strerror}); pick another with --port.", err=True)
        raise typer.Exit(2) from exc
    return listener


async def _serve(
    settings: Settings, listener: socket.socket, samples: Samples, port: int
) -> str | None:
    """Serve until Ctrl-C; the reason the service is not ready, if it is not."""
    config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no event)
        await asyncio.sleep(0.05)
    problem = None
    if server.started:
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"{_url(port)}/health/ready")
        if ready.status_code == 200:
            _announce(settings, samples, port)
        else:
            problem = str(ready.json().get("reason"))
            server.should_exit = True
    await serving
    return problem


def _announce(settings: Settings, samples: Samples, port: int) -> None:
    url = _url(port)
    patient = samples.example
    command = shlex.quote(sys.argv[0]) if Path(sys.argv[0]).name == "ehrmamba" else "ehrmamba"
    hook = f"{command} demo hook --patient {patient}"
    if port != DEFAULT_PORT:
        hook += f" --port {port}"
    lines = [
        f"{READY}: {url} (OpenAPI at {url}/docs)",
        f"  FHIR server  {settings.fhir_base_url}",
        f"  patients     {len(samples.patient_ids)} with hospital stays, drawn by "
        f"{samples.generator} (ids in {CACHE / 'samples.json'})",
        f"  model        {settings.model_path}",
        f"  store        {settings.database_url}",
        "",
        "Try:",
        f"  $ curl -X POST '{url}/patients/{patient}/predict?forecast=5'",
        f"  $ curl {url}/cds-services",
        f"  $ {hook}",
        "(the last one plays the EHR: it signs a fresh CDS Hooks JWT and calls patient-view)",
        "",
        "Ctrl-C stops the service and the FHIR server.",
    ]
    typer.echo("\n".join(lines))
