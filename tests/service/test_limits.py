"""Bodies over the limit are refused with 413 and an OperationOutcome, whether their size is
declared or only found while streaming; bodies within it reach the app intact."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel

from service.limits import BodySizeLimit

LIMIT = 64


class Payload(BaseModel):
    text: str


def _client(handled: list[bytes]) -> httpx.AsyncClient:
    """A client of an app that echoes the body and notes every body its handlers saw."""
    app = FastAPI()

    @app.post("/raw")
    async def raw(request: Request) -> int:
        body = await request.body()
        handled.append(body)
        return len(body)

    @app.post("/parsed")
    async def parsed(payload: Payload) -> int:
        handled.append(payload.text.encode())
        return len(payload.text)

    limited = BodySizeLimit(app, max_bytes=LIMIT)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=limited), base_url="http://test")


async def _chunks(body: bytes, size: int = 10) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _refused(response: httpx.Response) -> None:
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/fhir+json"
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "too-long"


async def test_a_declared_length_over_the_limit_never_reaches_the_app() -> None:
    handled: list[bytes] = []
    async with _client(handled) as client:
        response = await client.post("/raw", content=b"x" * (LIMIT + 1))

    _refused(response)
    assert handled == []


@pytest.mark.parametrize("route", ["/raw", "/parsed"])
async def test_a_streamed_body_over_the_limit_is_refused(route: str) -> None:
    handled: list[bytes] = []
    body = b'{"text": "' + b"x" * LIMIT + b'"}'
    async with _client(handled) as client:
        response = await client.post(route, content=_chunks(body))

    assert "content-length" not in response.request.headers
    _refused(response)
    assert handled == []


@pytest.mark.parametrize("streamed", [False, True], ids=["declared", "streamed"])
async def test_a_body_at_the_limit_passes_intact(streamed: bool) -> None:
    handled: list[bytes] = []
    body = bytes(range(LIMIT))
    async with _client(handled) as client:
        response = await client.post("/raw", content=_chunks(body) if streamed else body)

    assert response.status_code == 200
    assert handled == [body]
