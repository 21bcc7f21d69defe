"""A small Starlette app served by uvicorn in a thread of its own: the server the load
generators are tested against. Its handlers count what reaches them, so a test asserts
what really went over the socket, and they can hold requests back to play a slow server.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import ExitStack
from types import TracebackType

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.support.threaded_server import threaded_server

GATE_LIMIT_S = 20.0  # a gated request that waits this long answers 503


class LocalApp:
    """``with LocalApp(gate=n) as app:`` serves on ``app.url`` until the block ends.

    - ``POST /patients/{id}/predict``: counted by id and by API key; ids that start with
      ``busy`` answer 429 with ``Retry-After: 1``, the others 200.
    - ``GET /gate``: held until ``gate`` requests have arrived, then every one answers 200
      (503 if they never all arrive): only a generator that keeps sending without waiting
      for answers gets 200s.
    - ``GET /hang``: answers after a minute, far beyond any client timeout here.
    """

    def __init__(self, gate: int = 1) -> None:
        self.by_id: Counter[str] = Counter()
        self.keys: Counter[str | None] = Counter()
        self.refused = 0
        self.gate = gate
        self.arrived = 0
        self._opened: asyncio.Event | None = None
        routes = [
            Route("/patients/{patient_id}/predict", self._predict, methods=["POST"]),
            Route("/gate", self._gate),
            Route("/hang", self._hang),
        ]
        self._app = Starlette(routes=routes)
        self._stack = ExitStack()
        self.url = ""  # set on entering

    def __enter__(self) -> LocalApp:
        self.url = self._stack.enter_context(threaded_server(self._app))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    async def _predict(self, request: Request) -> Response:
        patient = request.path_params["patient_id"]
        self.by_id[patient] += 1
        self.keys[request.headers.get("x-api-key")] += 1
        if patient.startswith("busy"):
            self.refused += 1
            return PlainTextResponse("busy", 429, headers={"Retry-After": "1"})
        return PlainTextResponse("ok")

    async def _gate(self, _: Request) -> Response:
        if self._opened is None:  # made in the server's own event loop
            self._opened = asyncio.Event()
        self.arrived += 1
        if self.arrived >= self.gate:
            self._opened.set()
        try:
            await asyncio.wait_for(self._opened.wait(), GATE_LIMIT_S)
        except TimeoutError:
            return PlainTextResponse("the others never came", 503)
        return PlainTextResponse("ok")

    async def _hang(self, _: Request) -> Response:
        await asyncio.sleep(60)
        return PlainTextResponse("too late")
