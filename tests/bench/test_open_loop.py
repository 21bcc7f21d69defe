"""The open-loop generator sends on schedule whether or not answers come back."""

from __future__ import annotations

import httpx
import pytest

from bench import open_loop
from fhir_adapter.local_server import free_port
from tests.bench.local_app import LocalApp

COUNT = 12


async def test_every_request_goes_out_before_any_answer_comes_back() -> None:
    # The server answers none of them until all COUNT have arrived: a generator that
    # waited for answers before sending more would get 503s after the gate's limit.
    with LocalApp(gate=COUNT) as app:
        async with open_loop.client(app.url) as http:
            outcomes = await open_loop.run(
                http, lambda _: http.build_request("GET", "/gate"), rate=40, count=COUNT,
                timeout_s=60,
            )  # fmt: skip
    assert app.arrived == COUNT
    assert [o.status for o in outcomes] == [200] * COUNT
    assert [o.due_s for o in outcomes] == [i / 40 for i in range(COUNT)]
    sent = [o.sent_s for o in outcomes]
    assert sent == sorted(sent)
    # The last request went out before the first answer came back.
    assert sent[-1] <= outcomes[0].sent_s + outcomes[0].seconds


async def test_a_request_without_an_answer_ends_at_the_client_timeout() -> None:
    with LocalApp() as app:
        async with open_loop.client(app.url) as http:
            (outcome,) = await open_loop.run(
                http, lambda _: http.build_request("GET", "/hang"), rate=1, count=1,
                timeout_s=0.3,
            )  # fmt: skip
    assert (outcome.status, outcome.error) == (None, "timeout")
    assert outcome.seconds < 60  # it did not wait for the server's answer


async def test_a_refused_connection_is_an_outcome_not_an_exception() -> None:
    async with open_loop.client(f"http://127.0.0.1:{free_port()}") as http:
        outcomes = await open_loop.run(
            http, lambda _: http.build_request("GET", "/"), rate=100, count=2, timeout_s=5
        )
    assert [(o.status, o.error) for o in outcomes] == [(None, "ConnectError")] * 2


async def test_answers_keep_their_status_and_retry_after() -> None:
    with LocalApp() as app:
        async with open_loop.client(app.url, {"X-API-Key": "k"}) as http:
            ids = ["a", "busy-b"]
            outcomes = await open_loop.run(
                http,
                lambda i: http.build_request("POST", f"/patients/{ids[i % 2]}/predict"),
                rate=50,
                count=4,
                timeout_s=10,
            )
    assert [(o.status, o.retry_after) for o in outcomes] == [(200, None), (429, "1")] * 2
    assert app.keys == {"k": 4}


async def test_a_rate_must_be_positive() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="rate must be positive"):
            await open_loop.run(http, lambda _: http.build_request("GET", "/"), rate=0,
                                count=1, timeout_s=1)  # fmt: skip
