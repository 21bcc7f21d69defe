"""Fault injection for what a real FHIR server cannot be made to do on demand.

``FaultTransport`` wraps the real network transport: requests pass through to the real
server except those a rule answers first (a 429 with ``Retry-After``, a 503, ...).
``RewriteTransport`` lets every request reach the real server and changes its JSON answer
(a failed entry inside a real batch-response).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

Rule = Callable[[httpx.Request, int], httpx.Response | None]
# Given a request and the real server's JSON answer: a changed answer, or None to keep it.
Rewrite = Callable[[httpx.Request, Any], Any]
_WIRE = {"content-encoding", "content-length", "transfer-encoding"}


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


class RewriteTransport(httpx.AsyncBaseTransport):
    """Counts requests, sends each to the real server, and lets ``rewrite`` change the JSON
    body of its answer."""

    def __init__(self, rewrite: Rewrite) -> None:
        self.rewrite = rewrite
        self.requests: list[httpx.Request] = []
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self._real.handle_async_request(request)
        body = await response.aread()  # decoded: the headers that described the wire go
        headers = {k: v for k, v in response.headers.items() if k.lower() not in _WIRE}
        changed = self.rewrite(request, json.loads(body)) if body else None
        if changed is not None:
            body = json.dumps(changed).encode()
        return httpx.Response(response.status_code, headers=headers, content=body)

    async def aclose(self) -> None:
        await self._real.aclose()


def outcome(status: int, diagnostics: str = "injected") -> httpx.Response:
    """An OperationOutcome answer with ``status``."""
    issue = {"severity": "error", "code": "exception", "diagnostics": diagnostics}
    return httpx.Response(status, json={"resourceType": "OperationOutcome", "issue": [issue]})


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
