"""What the running service holds (settings, model, batcher, cache, store, the configured
FHIR server's client, CDS token verifier), and the FastAPI dependencies that hand it to
routes."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, Header, Request

from fhir_adapter.auth import Auth, BearerToken, NoAuth
from fhir_adapter.client import FhirClient, FhirClientConfig
from service import metrics
from service.admission import Admission
from service.batching import MicroBatcher
from service.cache import ResilientCache
from service.cds.jwt import ClientTokenVerifier
from service.outcomes import ServiceError
from service.patient_cache import PatientCache
from service.scoring import Prepared, Scored, Scorer
from service.settings import Settings
from service.store import Store


@dataclass
class ServiceState:
    settings: Settings
    cache: ResilientCache
    patients: PatientCache
    verifier: ClientTokenVerifier
    admission: Admission
    scorer: Scorer | None = None
    batcher: MicroBatcher[Prepared, Scored] | None = None
    store: Store | None = None
    # The configured FHIR server's client for the process's life (its connection pool);
    # CDS calls naming their own fhirServer make a client per call.
    fhir: FhirClient | None = None
    store_opener: asyncio.Task[None] | None = None  # retries a store that was down at start
    threads_before: tuple[int, int] | None = None  # torch and numba threads to restore at stop
    problems: dict[str, str] = field(default_factory=lambda: {"start": "starting"})
    checks: dict[str, str] = field(default_factory=dict)
    explaining: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    # Explanations a CDS call stopped waiting for: they finish into the cache (so the next
    # card or the patient view has them) and are cancelled at stop.
    background: set[asyncio.Task[object]] = field(default_factory=set)

    @property
    def not_ready(self) -> str | None:
        """Why the service cannot answer yet (None: it can)."""
        return "; ".join(self.problems.values()) or None

    def fhir_client(self) -> FhirClient:
        """The configured FHIR server's long-lived client; 503 when there is none."""
        if self.fhir is None:
            self.fhir_config()  # raises the 503 that says why
            raise ServiceError(503, "transient", "the FHIR client is not open",
                               headers={"Retry-After": "5"})  # fmt: skip
        return self.fhir

    def fhir_config(
        self, base_url: str | None = None, auth: Auth | None = None
    ) -> FhirClientConfig:
        """The configured FHIR server (or a CDS request's own ``fhirServer`` with its token);
        503 when there is none."""
        url = base_url or self.settings.fhir_base_url
        if not url:
            raise ServiceError(503, "not-supported", "no FHIR server is configured "
                               "(EHRMAMBA_FHIR_BASE_URL)")  # fmt: skip
        if auth is None:
            token = self.settings.fhir_token
            auth = BearerToken(token.get_secret_value()) if token and not base_url else NoAuth()
        return FhirClientConfig(
            base_url=url,
            timeout=self.settings.fhir_timeout,
            max_retries=self.settings.fhir_retries,
            auth=auth,
            observer=metrics.observe_fhir,
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


def ready_store(state: Annotated[ServiceState, Depends(get_state)]) -> Store:
    if state.store is None:
        raise ServiceError(503, "transient", f"not ready: {state.not_ready}",
                           headers={"Retry-After": "5"})  # fmt: skip
    return state.store


def require_api_key(
    state: Annotated[ServiceState, Depends(get_state)],
    x_api_key: Annotated[str | None, Header(description="An API key, if keys are set.")] = None,
    authorization: Annotated[str | None, Header(description="Or: Bearer <API key>.")] = None,
) -> str:
    """The caller's name for the audit trail. When keys are configured, one of them must
    come in ``X-API-Key`` or as a Bearer token (compared in constant time); the caller is
    then named by a short hash of its key, never the key."""
    keys = state.settings.api_keys
    if not keys:
        return "anonymous"
    given = x_api_key
    if given is None and authorization and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    raw = (given or "").encode()
    for key in keys:
        secret = key.get_secret_value().encode()
        if secrets.compare_digest(raw, secret):
            return "key:" + hashlib.sha256(secret).hexdigest()[:12]
    raise ServiceError(401, "login", "a valid X-API-Key header or Bearer token is required",
                       headers={"WWW-Authenticate": "ApiKey"})  # fmt: skip
