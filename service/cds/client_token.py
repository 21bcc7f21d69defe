"""The CDS client's side of CDS Hooks authentication: a signing key, its public half as a
JWKS for the service to trust, and one short-lived JWT per call. The demo command and the
tests play the EHR with it; the service itself never signs."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ClientAlg = Literal["ES384", "RS384"]


@dataclass
class ClientKey:
    """A CDS client's private signing key and the ``kid`` the service finds it by."""

    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    kid: str
    alg: ClientAlg

    @classmethod
    def generate(cls, alg: ClientAlg, kid: str | None = None) -> ClientKey:
        private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if alg == "ES384":
            private_key = ec.generate_private_key(ec.SECP384R1())
        else:
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(private_key, kid or uuid.uuid4().hex, alg)

    @classmethod
    def from_pem(cls, pem: bytes, kid: str) -> ClientKey:
        """A key saved with ``private_pem``; the PEM holds no kid, so it is given again."""
        private_key = load_pem_private_key(pem, password=None)
        if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
            private_key.curve, ec.SECP384R1
        ):
            return cls(private_key, kid, "ES384")
        if isinstance(private_key, rsa.RSAPrivateKey):
            return cls(private_key, kid, "RS384")
        raise ValueError("a CDS client key must be EC P-384 (ES384) or RSA (RS384)")

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def public_jwks(self) -> dict[str, Any]:
        """What the service is configured with (``jwks_file``) or fetches (``jku``)."""
        public = self.private_key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}]}


def sign_client_token(
    key: ClientKey,
    iss: str,
    aud: str,
    *,
    sub: str | None = None,
    lifetime: float = 300,
    jti: str | None = None,
    now: float | None = None,
    jku: str | None = None,
) -> str:
    """A JWT for one call to the CDS endpoint at ``aud`` (its full URL). ``sub`` is the
    client id and defaults to ``iss``; ``now`` lets tests issue tokens in the past or
    future."""
    issued = time.time() if now is None else now
    claims = {
        "iss": iss,
        "sub": sub or iss,
        "aud": aud,
        "exp": int(issued + lifetime),
        "iat": int(issued),
        "jti": jti or uuid.uuid4().hex,
    }
    headers = {"kid": key.kid, "typ": "JWT"}
    if jku is not None:
        headers["jku"] = jku
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)
