"""Credentials for FHIR requests: none, a static bearer token, or SMART Backend Services.

SMART Backend Services (client_credentials with a ``private_key_jwt`` client assertion):
the client signs a short-lived JWT (RS384 or ES384; ``iss`` = ``sub`` = client id,
``aud`` = token URL, ``exp`` at most five minutes ahead, a fresh ``jti``), trades it for an
access token, and reuses that token until shortly before it expires.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, Protocol

import httpx
import jwt

from fhir_adapter.errors import FhirUnauthorized, FhirUnavailable, FhirUpstreamError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_ASSERTION_LIFETIME_S = 300
_REFRESH_MARGIN_S = 60


class Auth(Protocol):
    """What the client needs from a credential."""

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        """Headers to add to a request (may fetch a token with ``http``)."""
        ...

    def invalidate(self) -> None:
        """Forget any cached token; called once after a 401 before retrying."""
        ...


class NoAuth:
    """An open server (a test server, or one behind a trusted network boundary)."""

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        return None


@dataclass(frozen=True)
class BearerToken:
    """A static bearer token, obtained by some other means."""

    token: str = field(repr=False)

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def invalidate(self) -> None:
        return None


class SmartBackendAuth:
    """SMART Backend Services: a signed client assertion traded for a cached access token.

    ``token_url`` may be left None: it is then read from the server's
    ``.well-known/smart-configuration`` on first use.
    """

    def __init__(
        self,
        *,
        client_id: str,
        private_key_pem: str,
        fhir_base_url: str,
        algorithm: Literal["RS384", "ES384"] = "RS384",
        token_url: str | None = None,
        scope: str = "system/*.read",
        key_id: str | None = None,
    ) -> None:
        if algorithm not in ("RS384", "ES384"):
            raise ValueError("SMART Backend Services allows only RS384 or ES384")
        self.client_id = client_id
        self._key = private_key_pem
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self.algorithm = algorithm
        self.token_url = token_url
        self.scope = scope
        self.key_id = key_id
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.client_id!r}, token_url={self.token_url!r})"

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        async with self._lock:
            if self._token is None or time.time() >= self._expires_at - _REFRESH_MARGIN_S:
                await self._refresh(http)
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        self._token = None

    def client_assertion(self, token_url: str) -> str:
        """A freshly signed client assertion JWT for ``token_url``."""
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": now + _ASSERTION_LIFETIME_S,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers = {"kid": self.key_id} if self.key_id else None
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    async def _refresh(self, http: httpx.AsyncClient) -> None:
        token_url = self.token_url or await self._discover(http)
        self.token_url = token_url
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.client_assertion(token_url),
        }
        try:
            response = await http.post(token_url, data=form, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise FhirUnavailable(f"token endpoint unreachable: {exc}", url=token_url) from exc
        body = _json_or_none(response)
        if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
            detail = body.get("error_description") or body.get("error") if body else None
            raise FhirUnauthorized(
                f"token request refused: {detail or response.reason_phrase}",
                url=token_url,
                status=response.status_code,
            )
        self._token = str(body["access_token"])
        expires_in = body.get("expires_in", 300)
        lifetime = float(expires_in) if isinstance(expires_in, int | float | str) else 300.0
        self._expires_at = time.time() + lifetime

    async def _discover(self, http: httpx.AsyncClient) -> str:
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        try:
            response = await http.get(url, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise FhirUnavailable(f"SMART configuration unreachable: {exc}", url=url) from exc
        body = _json_or_none(response)
        token_url = body.get("token_endpoint") if isinstance(body, dict) else None
        if response.status_code != 200 or not isinstance(token_url, str):
            raise FhirUpstreamError(
                "server publishes no SMART token_endpoint", url=url, status=response.status_code
            )
        return token_url


def _json_or_none(response: httpx.Response) -> dict[str, object] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
