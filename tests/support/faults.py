"""Fault injection for what a real FHIR server cannot be made to do on demand.

``FaultTransport`` wraps the real network transport: requests pass through to the real
server except those a rule answers first (a 429 with ``Retry-After``, a 503, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

Rule = Callable[[httpx.Request, int], httpx.Response | None]


class FaultTransport(httpx.AsyncBaseTransport):
    """Counts requests; ``rule(request, n)`` may answer request number ``n`` (from 1)."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.requests: list[httpx.Request] = []
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.rule(request, len(self.requests))
        if answer is not None:
            return answer
        return await self._real.handle_async_request(request)

    async def aclose(self) -> None:
        await self._real.aclose()


def first_n(n: int, status: int, headers: dict[str, str] | None = None) -> Rule:
    """Answer the first ``n`` requests with ``status`` and an OperationOutcome body."""

    def rule(request: httpx.Request, count: int) -> httpx.Response | None:
        if count > n:
            return None
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "throttled", "diagnostics": "injected"}],
        }
        return httpx.Response(status, headers=headers or {}, json=outcome)

    return rule
