"""Verification of the JWT a CDS client (an EHR) signs for every hook and feedback call.

CDS Hooks 2.0 ("Trusting CDS Clients") lets a service trust only EHRs it knows: the token's
``iss`` must be allow-listed, its key must come from that issuer's configured JWKS (a file,
or a ``jku`` URL listed for it, never a URL the token alone names), ``aud`` must be the
endpoint called, and a short life plus a ``jti`` seen once stop replays. Every check that
reads attacker-chosen data without a key comes before any key is looked up or fetched.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.cache import Cache
from service.settings import CdsIssuer

# Asymmetric only: an HMAC algorithm would let a public key serve as a shared secret.
ALGORITHMS = ("ES384", "RS384")
# The spec recommends tokens live five minutes; longer ones widen the replay window.
MAX_LIFETIME = 300.0
# Far above a real client token; refuses oversized input before any parsing.
MAX_TOKEN_CHARS = 8192
MAX_JWKS_BYTES = 64 * 1024
MIN_RSA_BITS = 2048

KeyIndex = dict[tuple[str, str], jwt.PyJWK]


class RejectReason(StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    ALG = "alg"
    KID = "kid"
    ISS = "iss"
    JKU = "jku"
    SIGNATURE = "signature"
    AUD = "aud"
    EXPIRED = "expired"
    IAT = "iat"
    LIFETIME = "lifetime"
    REPLAY = "replay"
    CLAIMS = "claims"


class JwtRejected(Exception):
    """A client token that is not accepted. The message is fixed text, safe to log and to
    return: it never repeats the token nor any value read from it."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClientClaims:
    """The verified identity of one CDS call; ``aud`` is the endpoint it was checked for."""

    iss: str
    sub: str
    aud: str
    jti: str
    exp: float
    iat: float
    tenant: str | None


@dataclass
class _KeySet:
    keys: KeyIndex
    loaded: float  # time.monotonic()


class ClientTokenVerifier:
    """Checks CDS client JWTs against the trusted issuers and remembers each ``jti``.

    ``replay`` should be shared by all replicas (Redis), or a token refused by one could
    be replayed to another. JWKS files are read once and JWKS URLs kept ``jwks_max_age``
    seconds; an unknown ``kid`` reloads the set, at most once per ``jwks_min_refresh``
    seconds, so a client can rotate keys without a restart but cannot make us fetch at will.
    """

    def __init__(
        self,
        issuers: Sequence[CdsIssuer],
        replay: Cache,
        leeway: float,
        *,
        http_client: Callable[[], httpx.AsyncClient] = httpx.AsyncClient,
        jku_timeout: float = 2.0,
        jwks_max_age: float = 300.0,
        jwks_min_refresh: float = 30.0,
    ) -> None:
        self._issuers = {issuer.iss: issuer for issuer in issuers}
        self._replay = replay
        self._leeway = leeway
        self._http_client = http_client
        self._jku_timeout = jku_timeout
        self._jwks_max_age = jwks_max_age
        self._jwks_min_refresh = jwks_min_refresh
        self._jws = jwt.PyJWS(algorithms=list(ALGORITHMS))
        self._keysets: dict[Path | str, _KeySet] = {}
        self._locks: dict[Path | str, asyncio.Lock] = {}

    async def verify(self, authorization: str | None, audience: str) -> ClientClaims:
        """The claims of the Bearer JWT in ``authorization`` (an ``Authorization`` header
        value), or ``JwtRejected``. ``audience`` is the full URL of the endpoint called."""
        token = _bearer(authorization)
        header, payload = self._parse(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise JwtRejected(RejectReason.ALG, "the JWT must be signed with ES384 or RS384")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise JwtRejected(RejectReason.KID, "the JWT header names no kid")
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise JwtRejected(RejectReason.ISS, "the JWT's issuer is not a trusted CDS client")
        key = await self._key(issuer, header.get("jku"), kid, alg)
        try:
            self._jws.decode_complete(token, key, algorithms=[alg])
        except jwt.PyJWTError:
            raise JwtRejected(RejectReason.SIGNATURE, "the JWT signature is not valid") from None
        claims = self._claims(payload, audience)
        await self._remember(claims)
        return claims

    def _parse(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Header and payload, not yet trusted: only to choose the key."""
        try:
            decoded = self._jws.decode_complete(token, options={"verify_signature": False})
            payload = json.loads(decoded["payload"])
        except (jwt.PyJWTError, ValueError, RecursionError):
            raise JwtRejected(RejectReason.MALFORMED, "the bearer token is not a JWT") from None
        header: dict[str, Any] = decoded["header"]
        typ = header.get("typ", "JWT")
        if not isinstance(payload, dict) or not isinstance(typ, str) or typ.upper() != "JWT":
            raise JwtRejected(RejectReason.MALFORMED, "the bearer token is not a JWT")
        return header, payload

    async def _key(self, issuer: CdsIssuer, jku: object, kid: str, alg: str) -> jwt.PyJWK:
        source: Path | str
        if jku is None:
            if issuer.jwks_file is None:
                raise JwtRejected(RejectReason.KID, "no JWKS is configured for this issuer")
            source = issuer.jwks_file
        elif isinstance(jku, str) and jku in issuer.jku:
            source = jku
        else:
            raise JwtRejected(RejectReason.JKU, "the JWT's jku is not allowed for its issuer")
        key = (await self._keyset(source)).keys.get((kid, alg))
        if key is None:
            key = (await self._keyset(source, refresh=True)).keys.get((kid, alg))
        if key is None:
            raise JwtRejected(RejectReason.KID, "the issuer has no key with this kid and alg")
        return key

    async def _keyset(self, source: Path | str, *, refresh: bool = False) -> _KeySet:
        """The cached key set of ``source``, loaded when absent or older than allowed;
        one load at a time per source, so a burst of calls makes one request."""
        async with self._locks.setdefault(source, asyncio.Lock()):
            cached = self._keysets.get(source)
            if cached is not None:
                if refresh:
                    max_age = self._jwks_min_refresh
                else:
                    max_age = math.inf if isinstance(source, Path) else self._jwks_max_age
                if time.monotonic() - cached.loaded < max_age:
                    return cached
            keyset = _KeySet(await self._load(source), time.monotonic())
            self._keysets[source] = keyset
            return keyset

    async def _load(self, source: Path | str) -> KeyIndex:
        reason = RejectReason.KID if isinstance(source, Path) else RejectReason.JKU
        try:
            raw = source.read_bytes() if isinstance(source, Path) else await self._fetch(source)
            return _index(json.loads(raw))
        except (OSError, ValueError, RecursionError, httpx.HTTPError):
            raise JwtRejected(reason, "the issuer's JWKS could not be loaded") from None

    async def _fetch(self, url: str) -> bytes:
        """The body at an allow-listed ``jku``: no redirects (they could lead anywhere),
        a deadline for the whole exchange and a size cap, so a slow or huge answer cannot
        hold a request."""
        async with (
            asyncio.timeout(self._jku_timeout),
            self._http_client() as client,
            client.stream(
                "GET", url, follow_redirects=False, timeout=self._jku_timeout
            ) as response,
        ):
            if response.status_code != 200:
                raise ValueError(f"JWKS answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS too large")
            return bytes(body)

    def _claims(self, payload: Mapping[str, Any], audience: str) -> ClientClaims:
        claims = ClientClaims(
            iss=_text(payload, "iss"),
            sub=_text(payload, "sub"),
            aud=audience,
            jti=_text(payload, "jti"),
            exp=_number(payload, "exp"),
            iat=_number(payload, "iat"),
            tenant=_text(payload, "tenant") if "tenant" in payload else None,
        )
        aud = payload.get("aud")
        if aud != audience and not (isinstance(aud, list) and audience in aud):
            raise JwtRejected(RejectReason.AUD, "the JWT's aud is not this CDS service's URL")
        now = time.time()
        if now > claims.exp + self._leeway:
            raise JwtRejected(RejectReason.EXPIRED, "the JWT has expired")
        if claims.iat > now + self._leeway:
            raise JwtRejected(RejectReason.IAT, "the JWT is issued in the future")
        lifetime = claims.exp - claims.iat
        if not 0 < lifetime <= MAX_LIFETIME + self._leeway:
            raise JwtRejected(RejectReason.LIFETIME, "the JWT must live between 0 and 5 minutes")
        return claims

    async def _remember(self, claims: ClientClaims) -> None:
        """Refuses a second use of ``jti``. Kept until the token could no longer pass the
        expiry check anyway; the key is a hash, so the cache holds no token material."""
        digest = hashlib.sha256(f"{claims.iss}\x00{claims.jti}".encode()).hexdigest()
        ttl = max(1.0, claims.exp - time.time() + self._leeway)
        if not await self._replay.add(f"ehrmamba:jti:{digest}", b"1", ttl):
            raise JwtRejected(RejectReason.REPLAY, "the JWT's jti has been used before")


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise JwtRejected(RejectReason.MISSING, "a Bearer JWT is required")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        raise JwtRejected(RejectReason.MALFORMED, "the Authorization header is not a Bearer JWT")
    return token


def _index(document: object) -> KeyIndex:
    """Usable signing keys by (kid, alg). Keys of other types, sizes or uses are left out
    rather than failing the set, so one odd entry does not lock the client out."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("not a JSON Web Key Set")
    index: KeyIndex = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        key = _signing_key(jwk)
        if key is not None:
            index.setdefault((jwk["kid"], key.algorithm_name), key)
    return index


def _signing_key(jwk: dict[str, Any]) -> jwt.PyJWK | None:
    """The public key of an EC P-384 or RSA JWK, bound to ES384 or RS384."""
    kty = jwk.get("kty")
    alg = "ES384" if kty == "EC" else "RS384" if kty == "RSA" else None
    if alg is None or jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig":
        return None
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    public = key.key
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP384R1):
        return key
    if isinstance(public, rsa.RSAPublicKey) and public.key_size >= MIN_RSA_BITS:
        return key
    return None


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise JwtRejected(RejectReason.CLAIMS, f"the JWT's {name} claim is missing or invalid")
    return value


def _number(payload: Mapping[str, Any], name: str) -> float:
    """A finite NumericDate: NaN or infinity would slip through every time comparison."""
    value = payload.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise JwtRejected(RejectReason.CLAIMS, f"the JWT's {name} claim is missing or invalid")
