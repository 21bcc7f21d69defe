"""An open-loop load generator: requests leave on a fixed schedule whatever the server does.

A closed-loop generator (wrk, or N clients each waiting for its answer) slows down with
the server, so a struggling server is offered less load and looks healthier than it is
(coordinated omission). A hospital's clients do not wait for each other: here request
``i`` is due ``i / rate`` seconds after the start and goes out then, on a connection of
its own if none is free, even if every earlier one is still unanswered. Each request is
bounded by a client timeout over its whole exchange, so a stalled server shows up as
timeouts, not as a generator that stopped sending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Outcome:
    """One request. Offsets are seconds from the generator's start."""

    due_s: float  # when the schedule said to send it
    sent_s: float  # when it went out
    seconds: float  # from sending to the answer, or to giving up
    status: int | None  # None: no answer (timeout or a transport error)
    error: str | None  # "timeout", or the transport error's class name
    retry_after: str | None  # the answer's Retry-After header

    @property
    def late_s(self) -> float:
        """How far behind its schedule the request went out."""
        return self.sent_s - self.due_s


def client(base_url: str, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """A client whose pool never makes a request wait for a free connection (a capped
    pool would quietly turn the generator closed-loop)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=None)


async def run(
    http: httpx.AsyncClient,
    request: Callable[[int], httpx.Request],
    *,
    rate: float,
    count: int,
    timeout_s: float,
) -> list[Outcome]:
    """Send ``request(i)`` for i in 0..count-1, request i at ``i / rate`` seconds, and
    return every outcome in order once the last one is answered or timed out."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    loop = asyncio.get_running_loop()
    start = loop.time()
    pending: list[asyncio.Task[Outcome]] = []
    for i in range(count):
        due = i / rate
        delay = start + due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(_send(http, request(i), start, due, timeout_s)))
    return list(await asyncio.gather(*pending))


async def _send(
    http: httpx.AsyncClient, request: httpx.Request, start: float, due: float, timeout_s: float
) -> Outcome:
    loop = asyncio.get_running_loop()
    began = loop.time()
    sent = began - start
    try:
        async with asyncio.timeout(timeout_s):
            response = await http.send(request)  # the body is read before it returns
    except TimeoutError:
        return Outcome(due, sent, loop.time() - began, None, "timeout", None)
    except httpx.TransportError as exc:
        return Outcome(due, sent, loop.time() - began, None, type(exc).__name__, None)
    retry_after = response.headers.get("retry-after")
    return Outcome(due, sent, loop.time() - began, response.status_code, None, retry_after)
