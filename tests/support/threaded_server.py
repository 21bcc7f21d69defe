"""An ASGI app under uvicorn in a thread of its own, on a free loopback port: the small
servers tests put beside the real processes (a fault-injecting proxy, a counting load
target, the service for a real browser). Its own event loop, so a stalled answer never
blocks the test's loop."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

START_TIMEOUT_S = 120.0  # an app with a lifespan (the service loading its model) on a busy machine


@contextmanager
def threaded_server(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` (lifespan included) until the block ends; yields its base URL. At exit,
    answers still running are cancelled after a second."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, args=([sock],), name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the threaded server stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("the threaded server did not start in time")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
