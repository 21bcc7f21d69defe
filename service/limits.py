"""A cap on request bodies, so that one oversized CDS prefetch or a body that never ends
cannot fill a worker's memory."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.outcomes import FHIR_JSON, operation_outcome


def _declared_length(scope: Scope) -> int | None:
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):  # absent (chunked) or unparsable: counting still applies
        return None


class BodySizeLimit:
    """Answers 413 with an OperationOutcome to a body over ``max_bytes``.

    A declared Content-Length over the limit is refused before the app runs, without
    reading the body. A body without one is counted as the app reads it: the chunk that
    crosses the limit is never handed over; the 413 goes out at once and the app sees the
    client gone, so whatever it answers or raises about that is dropped.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> JSONResponse:
        return JSONResponse(
            operation_outcome("too-long", f"request body over {self.max_bytes} bytes"),
            status_code=413,
            media_type=FHIR_JSON,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refusal()(scope, receive, send)
            return

        received = 0
        app_responded = False
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not app_responded:
                        await self._refusal()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal app_responded
            if refused and not app_responded:
                return  # the 413 has answered this request
            app_responded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, send_unless_refused)
        except ClientDisconnect:
            # After a refusal this is the disconnect fed to the app: expected, and answered.
            if not refused:
                raise
