"""A loopback HTTP server in front of a real FHIR server, for the faults a real server
cannot be made to show on demand: a 500, a 429, a body that is not JSON, a search page
that is gone, an answer that never comes or comes a byte at a time.

The service reaches it over real sockets through its own FHIR client, exactly as it
reaches a FHIR server, so nothing in the service is replaced or needs a seam. Requests no
rule answers are forwarded to the real server, with its base URL rewritten in the answer
so that paging links lead back through this server.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Called with each request and its number (from 1); an answer, or None to forward it.
Rule = Callable[[Request, int], Awaitable[Response | None]]


def is_later_page(request: Request) -> bool:
    """Whether ``request`` follows a search's ``next`` link (sekmet pages by ``_offset``)."""
    return int(request.query_params.get("_offset", "0")) > 0


class FaultServer:
    """Use as ``with FaultServer(upstream_base_url) as fhir:``; set ``rule`` at any time."""

    def __init__(self, upstream: str) -> None:
        self.upstream_root = upstream.removesuffix("/fhir")
        self.rule: Rule | None = None
        self.seen: list[str] = []  # path and query of every request, in order
        self.faults = 0  # requests a rule answered
        self._upstream: httpx.AsyncClient | None = None
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.root_url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        routes = [Route("/{path:path}", self._handle, methods=["GET"])]
        app = Starlette(routes=routes, lifespan=self._lifespan)
        # At exit, answers still sleeping in a rule are cancelled after a second.
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=1)  # fmt: skip
        self._server = uvicorn.Server(config)
        # Its own thread and event loop: a stalled answer never blocks the test's loop.
        self._thread = threading.Thread(target=self._server.run, args=([self._socket],))

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/fhir"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the fault server did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=30) as upstream:  # in the server's own loop
            self._upstream = upstream
            yield

    async def _handle(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        self.seen.append(target)
        rule = self.rule
        if rule is not None:
            answer = await rule(request, len(self.seen))
            if answer is not None:
                self.faults += 1
                return answer
        assert self._upstream is not None
        upstream = await self._upstream.get(
            self.upstream_root + target, headers={"Accept": request.headers.get("accept", "*/*")}
        )
        body = upstream.content.replace(self.upstream_root.encode(), self.root_url.encode())
        return Response(body, upstream.status_code, media_type=upstream.headers.get("content-type"))
