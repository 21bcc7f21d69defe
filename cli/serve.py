"""``ehrmamba serve``: the inference service under uvicorn. Configuration comes from the
environment (``EHRMAMBA_*``, see ``service/settings.py``), never from flags, so every
worker process reads the same settings."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

app = typer.Typer(help="Run the inference service.")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Serve predictions over HTTP (OpenAPI at /docs)."""
    uvicorn.run("service.app:create_app", factory=True, host=host, port=port,
                workers=workers, proxy_headers=False,
                access_log=False)  # its lines would carry patient ids in paths  # fmt: skip
