"""Typed errors for everything that can go wrong talking to a FHIR server.

Callers branch on the class, never on message text: the service maps each one to its own
HTTP status (404, 401, 502, 504, 503) and FHIR ``OperationOutcome`` answer.
"""

from __future__ import annotations

from typing import Any


class FhirError(Exception):
    """Base class. ``status`` is the upstream HTTP status when there was one.

    ``outcome`` holds the server's OperationOutcome when it sent one, so its diagnostics
    can be shown to an operator verbatim.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status = status
        self.outcome = outcome

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        code = f" [HTTP {self.status}]" if self.status else ""
        return f"{self.message}{code}{where}"


class FhirNotFound(FhirError):
    """The resource (often the patient) does not exist or is gone (404/410)."""


class FhirUnauthorized(FhirError):
    """The server refused our credentials (401/403), or the token endpoint did."""


class FhirUpstreamError(FhirError):
    """The server answered, but wrongly: 5xx, an unexpected 4xx, or a body that is not FHIR."""


class FhirTimeout(FhirError):
    """The server did not answer within the configured timeout."""


class FhirUnavailable(FhirError):
    """The server could not be reached at all (refused, reset, DNS), after retries."""
