"""``ehrmamba serve``: the inference service under uvicorn. Configuration comes from the
environment (``EHRMAMBA_*``, see ``service/settings.py``), never from flags, so every
worker process reads the same settings.

With several workers, Prometheus values live in memory-mapped files that every worker
writes and ``/metrics`` sums; prometheus_client finds the folder through the
``PROMETHEUS_MULTIPROC_DIR`` environment variable, which must be set before any worker
imports it and must start empty. This command makes that folder and sets the variable.
Likewise, a view link signed by one worker must open on another: without a configured
``EHRMAMBA_VIEW_TOKEN_SECRET``, this command draws one key and hands it to all workers.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from service.settings import Settings

app = typer.Typer(help="Run the inference service.")
WORKER_START_S = 120


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    metrics_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for multi-worker metrics (emptied at start); default: a "
            "fresh temporary folder when --workers > 1."
        ),
    ] = None,
) -> None:
    """Serve predictions over HTTP (OpenAPI at /docs)."""
    if workers > 1 or metrics_dir is not None:
        folder = metrics_dir or Path(tempfile.mkdtemp(prefix="ehrmamba-metrics-"))
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    if workers > 1 and Settings().view_token_secret is None:
        os.environ["EHRMAMBA_VIEW_TOKEN_SECRET"] = secrets.token_hex(32)
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port,
                workers=workers, proxy_headers=False,
                access_log=False,  # its lines would carry patient ids in paths
                # A new worker imports torch and the model before it answers the parent's
                # health check: 8 s on a busy 2-core machine, past uvicorn's default 5 s,
                # which would kill and restart workers forever.
                timeout_worker_healthcheck=WORKER_START_S)  # fmt: skip
