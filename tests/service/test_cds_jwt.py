"""CDS client JWTs: the tokens a real EHR would send are accepted, and each known attack on
JWT verification is refused for the right reason, without leaking the token."""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.utils import base64url_encode

from service.cache import MemoryCache, RedisCache
from service.cds.client_token import ClientAlg, ClientKey, sign_client_token
from service.cds.jwt import ClientClaims, ClientTokenVerifier, JwtRejected, RejectReason
from service.settings import CdsIssuer

ISS = "https://ehr.example.org"
AUD = "https://cds.example.org/cds-services/patient-view"
OTHER_SERVICE = "https://cds.example.org/cds-services/encounter-start"
LEEWAY = 30.0


class JwksServer:
    """A real HTTP server on loopback that serves JWKS documents and counts requests."""

    def __init__(self) -> None:
        self.documents: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                document = server.documents.get(self.path)
                body = json.dumps(document).encode()
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class RecordingCache(MemoryCache):
    """Remembers what the verifier stores, to look at its keys and lifetimes."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, float]] = []

    async def add(self, key: str, value: bytes, ttl: float) -> bool:
        self.added.append((key, ttl))
        return await super().add(key, value, ttl)


@pytest.fixture(scope="module")
def es_key() -> ClientKey:
    return ClientKey.generate("ES384")


@pytest.fixture(scope="module")
def rs_key() -> ClientKey:
    return ClientKey.generate("RS384")


@pytest.fixture(scope="module")
def jwks_http() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


@pytest.fixture
def jwks_server(jwks_http: JwksServer) -> JwksServer:
    """The module's server, with nothing published and no requests counted yet."""
    jwks_http.documents.clear()
    jwks_http.requests.clear()
    return jwks_http


@pytest.fixture
def issuers(
    tmp_path: Path, es_key: ClientKey, rs_key: ClientKey, jwks_server: JwksServer
) -> list[CdsIssuer]:
    """The trusted EHR: both keys in a JWKS file, and one JWKS URL allowed as jku."""
    jwks_file = tmp_path / "ehr-jwks.json"
    keys = es_key.public_jwks()["keys"] + rs_key.public_jwks()["keys"]
    jwks_file.write_text(json.dumps({"keys": keys}))
    return [CdsIssuer(iss=ISS, jwks_file=jwks_file, jku=[jwks_server.url("/jwks")])]


@pytest.fixture
def verifier(issuers: list[CdsIssuer]) -> ClientTokenVerifier:
    return ClientTokenVerifier(issuers, MemoryCache(), LEEWAY)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": ISS,
        "sub": "ehr-client",
        "aud": AUD,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        **overrides,
    }


def forge(header: dict[str, object], payload: dict[str, object], secret: bytes | None) -> str:
    """A token put together by hand, as an attacker would: HS256 with ``secret``, or
    unsigned when ``secret`` is None."""
    signing_input = b".".join(
        base64url_encode(json.dumps(part).encode()) for part in (header, payload)
    )
    signature = b"" if secret is None else hmac.new(secret, signing_input, "sha256").digest()
    return (signing_input + b"." + base64url_encode(signature)).decode()


async def rejected(
    verifier: ClientTokenVerifier, authorization: str | None, audience: str = AUD
) -> RejectReason:
    """The reason ``authorization`` is refused, after checking the refusal hides the token."""
    with pytest.raises(JwtRejected) as caught:
        await verifier.verify(authorization, audience)
    _, _, token = (authorization or "").partition(" ")
    if token:
        assert token not in str(caught.value)
        assert token not in repr(caught.value)
    return caught.value.reason


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
async def test_valid_token_is_accepted(
    verifier: ClientTokenVerifier, es_key: ClientKey, rs_key: ClientKey, alg: ClientAlg
) -> None:
    key = es_key if alg == "ES384" else rs_key
    token = sign_client_token(key, ISS, AUD, sub="ehr-client", jti="call-1-" + alg)

    accepted = await verifier.verify(bearer(token), AUD)

    payload = jwt.decode(token, options={"verify_signature": False})
    assert accepted == ClientClaims(
        iss=ISS,
        sub="ehr-client",
        aud=AUD,
        jti="call-1-" + alg,
        exp=payload["exp"],
        iat=payload["iat"],
        tenant=None,
    )


async def test_key_saved_as_pem_signs_accepted_tokens(
    verifier: ClientTokenVerifier, es_key: ClientKey
) -> None:
    reloaded = ClientKey.from_pem(es_key.private_pem(), es_key.kid)
    assert reloaded.alg == "ES384"
    token = jwt.encode(
        claims(tenant="hospital-1"), reloaded.private_key, "ES384", {"kid": es_key.kid}
    )

    assert (await verifier.verify(bearer(token), AUD)).tenant == "hospital-1"


async def test_aud_may_be_a_list_naming_the_service(
    verifier: ClientTokenVerifier, es_key: ClientKey
) -> None:
    token = jwt.encode(
        claims(aud=[OTHER_SERVICE, AUD]), es_key.private_key, "ES384", {"kid": es_key.kid}
    )

    assert (await verifier.verify(bearer(token), AUD)).aud == AUD


@pytest.mark.parametrize(
    ("options", "issued_ago", "reason"),
    [
        pytest.param({"aud": OTHER_SERVICE}, 0, RejectReason.AUD, id="other-service"),
        pytest.param({"aud": AUD + "/"}, 0, RejectReason.AUD, id="trailing-slash"),
        pytest.param({}, 400, RejectReason.EXPIRED, id="expired"),
        pytest.param({}, -120, RejectReason.IAT, id="iat-in-future"),
        pytest.param({"lifetime": 3600}, 0, RejectReason.LIFETIME, id="lifetime-too-long"),
        pytest.param({"iss": "https://evil.example.org"}, 0, RejectReason.ISS, id="unknown-iss"),
    ],
)
async def test_bad_claims_are_refused(
    verifier: ClientTokenVerifier,
    es_key: ClientKey,
    options: dict[str, Any],
    issued_ago: float,
    reason: RejectReason,
) -> None:
    token = sign_client_token(
        es_key, **{"iss": ISS, "aud": AUD, "now": time.time() - issued_ago, **options}
    )

    assert await rejected(verifier, bearer(token)) == reason


async def test_expired_within_leeway_is_accepted(
    verifier: ClientTokenVerifier, es_key: ClientKey
) -> None:
    token = sign_client_token(es_key, ISS, AUD, now=time.time() - 300 - LEEWAY / 2)

    await verifier.verify(bearer(token), AUD)


async def test_missing_jti_is_refused(verifier: ClientTokenVerifier, es_key: ClientKey) -> None:
    payload = {name: value for name, value in claims().items() if name != "jti"}
    token = jwt.encode(payload, es_key.private_key, "ES384", {"kid": es_key.kid})

    assert await rejected(verifier, bearer(token)) == RejectReason.CLAIMS


async def test_unsigned_token_is_refused(verifier: ClientTokenVerifier, es_key: ClientKey) -> None:
    token = forge({"alg": "none", "typ": "JWT", "kid": es_key.kid}, claims(), None)

    assert await rejected(verifier, bearer(token)) == RejectReason.ALG


async def test_hs256_with_public_key_as_secret_is_refused_before_any_key_lookup(
    verifier: ClientTokenVerifier, es_key: ClientKey, jwks_server: JwksServer
) -> None:
    """The classic key confusion: the public key, which anyone may hold, as HMAC secret."""
    jwks_server.documents["/jwks"] = es_key.public_jwks()
    public_pem = es_key.private_key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    header: dict[str, object] = {"alg": "HS256", "typ": "JWT", "kid": es_key.kid}
    for secret in (public_pem, json.dumps(es_key.public_jwks()).encode()):
        for jku in (None, jwks_server.url("/jwks")):
            token = forge({**header, "jku": jku} if jku else header, claims(), secret)
            assert await rejected(verifier, bearer(token)) == RejectReason.ALG
    assert jwks_server.requests == []


async def test_replayed_token_is_refused(verifier: ClientTokenVerifier, es_key: ClientKey) -> None:
    token = sign_client_token(es_key, ISS, AUD)
    await verifier.verify(bearer(token), AUD)

    assert await rejected(verifier, bearer(token)) == RejectReason.REPLAY


async def test_replay_is_refused_across_verifiers_sharing_redis(
    issuers: list[CdsIssuer], es_key: ClientKey
) -> None:
    """Two replicas sharing one Redis: a token used on one is refused by the other. Redis
    runs wherever these tests do, so its absence fails this test."""
    redis = RedisCache("redis://127.0.0.1:6379")
    try:
        first = ClientTokenVerifier(issuers, redis, LEEWAY)
        second = ClientTokenVerifier(issuers, redis, LEEWAY)
        token = sign_client_token(es_key, ISS, AUD)
        await first.verify(bearer(token), AUD)

        assert await rejected(second, bearer(token)) == RejectReason.REPLAY
    finally:
        await redis.aclose()


async def test_forged_token_cannot_burn_a_jti(
    verifier: ClientTokenVerifier, es_key: ClientKey
) -> None:
    impostor = ClientKey.generate("ES384", kid=es_key.kid)
    forged = sign_client_token(impostor, ISS, AUD, jti="next-call")
    assert await rejected(verifier, bearer(forged)) == RejectReason.SIGNATURE

    await verifier.verify(bearer(sign_client_token(es_key, ISS, AUD, jti="next-call")), AUD)


async def test_unknown_kid_is_refused(verifier: ClientTokenVerifier) -> None:
    token = sign_client_token(ClientKey.generate("ES384", kid="unknown"), ISS, AUD)

    assert await rejected(verifier, bearer(token)) == RejectReason.KID


async def test_kid_of_a_key_of_another_type_is_refused(
    verifier: ClientTokenVerifier, es_key: ClientKey, rs_key: ClientKey
) -> None:
    """An RS384 token naming the EC key's kid finds no RSA key under that kid."""
    token = sign_client_token(ClientKey(rs_key.private_key, es_key.kid, "RS384"), ISS, AUD)

    assert await rejected(verifier, bearer(token)) == RejectReason.KID


async def test_jku_not_allowed_is_refused_without_a_request(
    verifier: ClientTokenVerifier, jwks_server: JwksServer
) -> None:
    attacker = ClientKey.generate("ES384")
    jwks_server.documents["/attacker"] = attacker.public_jwks()
    token = sign_client_token(attacker, ISS, AUD, jku=jwks_server.url("/attacker"))

    assert await rejected(verifier, bearer(token)) == RejectReason.JKU
    assert jwks_server.requests == []


async def test_allowed_jku_serves_the_key(
    verifier: ClientTokenVerifier, jwks_server: JwksServer
) -> None:
    """A key published only at the allowed jku; fetched once, then reused."""
    rotated = ClientKey.generate("RS384")
    jwks_server.documents["/jwks"] = rotated.public_jwks()

    for _ in range(2):
        token = sign_client_token(rotated, ISS, AUD, jku=jwks_server.url("/jwks"))
        assert (await verifier.verify(bearer(token), AUD)).iss == ISS
    assert jwks_server.requests == ["/jwks"]


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        pytest.param(None, RejectReason.MISSING, id="no-header"),
        pytest.param("", RejectReason.MISSING, id="empty-header"),
        pytest.param("Basic ZWhyOnNlY3JldA==", RejectReason.MALFORMED, id="not-bearer"),
        pytest.param("Bearer", RejectReason.MALFORMED, id="bearer-without-token"),
        pytest.param("Bearer not-a-jwt", RejectReason.MALFORMED, id="garbage"),
        pytest.param("Bearer a.b.c", RejectReason.MALFORMED, id="garbage-segments"),
    ],
)
async def test_malformed_authorization_is_refused(
    verifier: ClientTokenVerifier, authorization: str | None, reason: RejectReason
) -> None:
    assert await rejected(verifier, authorization) == reason


async def test_replay_store_sees_a_hash_kept_for_the_token_life(
    issuers: list[CdsIssuer], es_key: ClientKey
) -> None:
    replay = RecordingCache()
    verifier = ClientTokenVerifier(issuers, replay, LEEWAY)
    token = sign_client_token(es_key, ISS, AUD, jti="call-7", lifetime=120)

    await verifier.verify(bearer(token), AUD)

    [(key, ttl)] = replay.added
    assert key.startswith("ehrmamba:jti:")
    assert "call-7" not in key
    assert 120 + LEEWAY - 5 < ttl <= 120 + LEEWAY
