"""What the running service holds (settings, the loaded model, the FHIR client settings),
and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request

from fhir_adapter.auth import BearerToken, NoAuth
from fhir_adapter.client import FhirClientConfig
from service.outcomes import ServiceError
from service.scoring import Scorer
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    scorer: Scorer | None = None
    not_ready: str | None = "starting"  # why the service cannot answer yet
    checks: dict[str, str] = field(default_factory=dict)

    def fhir_config(self) -> FhirClientConfig:
        """The configured FHIR server; 503 when there is none."""
        url = self.settings.fhir_base_url
        if not url:
            raise ServiceError(503, "not-supported", "no FHIR server is configured "
                               "(EHRMAMBA_FHIR_BASE_URL)")  # fmt: skip
        token = self.settings.fhir_token
        return FhirClientConfig(
            base_url=url,
            timeout=self.settings.fhir_timeout,
            max_retries=self.settings.fhir_retries,
            auth=BearerToken(token.get_secret_value()) if token else NoAuth(),
        )


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def ready_scorer(state: Annotated[ServiceState, Depends(get_state)]) -> Scorer:
    """The loaded model, or 503 with the reason it is not there."""
    if state.scorer is None:
        raise ServiceError(503, "transient", f"not ready: {state.not_ready}",
                           headers={"Retry-After": "5"})  # fmt: skip
    return state.scorer


def require_api_key(
    state: Annotated[ServiceState, Depends(get_state)],
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """When keys are configured, one of them must come in ``X-API-Key`` (compared in
    constant time)."""
    keys = state.settings.api_keys
    if not keys:
        return
    given = (x_api_key or "").encode()
    if not any(secrets.compare_digest(given, k.get_secret_value().encode()) for k in keys):
        raise ServiceError(401, "login", "a valid X-API-Key header is required",
                           headers={"WWW-Authenticate": "ApiKey"})  # fmt: skip
