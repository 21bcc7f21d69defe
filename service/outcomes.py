"""Errors as FHIR ``OperationOutcome`` JSON with the status a client can act on: the shape
FHIR and CDS Hooks clients already parse."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

FHIR_JSON = "application/fhir+json"
log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A failure with an HTTP status, an OperationOutcome issue code and a message that is
    safe to show (never a token, never a stack trace)."""

    def __init__(
        self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.headers = headers or {}


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


async def service_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse(
        operation_outcome(exc.code, exc.diagnostics),
        status_code=exc.status,
        headers=exc.headers,
        media_type=FHIR_JSON,
    )


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
        for e in exc.errors()
    )
    return JSONResponse(
        operation_outcome("invalid", problems or "invalid request"),
        status_code=422,
        media_type=FHIR_JSON,
    )


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """The framework's own refusals as OperationOutcome too: no such route (404), method
    not allowed (405), and a body FastAPI cannot decode (not UTF-8, nested too deep), which
    it answers 400; that is answered 422 like every other body that is not valid JSON."""
    assert isinstance(exc, HTTPException)
    status = 422 if exc.status_code == 400 else exc.status_code
    code = {404: "not-found", 405: "not-supported", 422: "invalid"}.get(status, "processing")
    return JSONResponse(
        operation_outcome(code, str(exc.detail)),
        status_code=status,
        headers=exc.headers,
        media_type=FHIR_JSON,
    )


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not a client's fault: 500 with no detail in the body (no stack trace, nothing
    from the request); the exception type goes to the log under the route template, never
    the raw path, which may hold a patient id."""
    route = getattr(request.scope.get("route"), "path", "unmatched")
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, route)
    return JSONResponse(
        operation_outcome("exception", "internal error"), status_code=500, media_type=FHIR_JSON
    )
