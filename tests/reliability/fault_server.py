"""A loopback HTTP server in front of a real FHIR server, for the faults a real server
cannot be made to show on demand: a 500, a 429, a body that is not JSON, a search page
that is gone, an answer that never comes or comes a byte at a time.

The service reaches it over real sockets through its own FHIR client, exactly as it
reaches a FHIR server, so nothing in the service is replaced or needs a seam. Requests no
rule answers are forwarded to the real server, with its base URL rewritten in the answer
so that paging links lead back through this server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, asynccontextmanager
from types import TracebackType

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.threaded_server import threaded_server

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
        self.root_url = ""  # set on entering
        routes = [Route("/{path:path}", self._handle, methods=["GET"])]
        self._app = Starlette(routes=routes, lifespan=self._lifespan)
        self._stack = ExitStack()

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/fhir"

    def __enter__(self) -> FaultServer:
        self.root_url = self._stack.enter_context(threaded_server(self._app))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

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
