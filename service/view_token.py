"""Short-lived signed links to one patient's view page.

A clinician's browser that follows a CDS card's link cannot send an API key, so the link
carries its own permission: ``<expiry>.<signature>``, the signature an HMAC-SHA256 over the
patient id, the FHIR server and the expiry (Unix seconds). It opens that one patient's
page on that one server until it expires, and nothing else: any other patient, server or
expiry changes the signature. The key is ``view_token_secret``; unset, each process draws
its own, so replicas (and the workers of one ``ehrmamba serve``, which shares one drawn
key among them) must share the key for a link made by one to work on another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from enum import Enum

from service.settings import Settings

# Drawn once per process: every ViewTokens built from settings without a secret shares it,
# so the CDS route and the view route agree.
_PROCESS_KEY = secrets.token_bytes(32)
_PURPOSE = "ehrmamba-view-v1"  # a key shared with another use never signs the same bytes


class Rejection(Enum):
    MALFORMED = "malformed"
    SIGNATURE = "signature"  # forged, or for another patient or server: told apart by no one
    EXPIRED = "expired"


class ViewTokenRejected(Exception):
    def __init__(self, reason: Rejection) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True)
class ViewTokens:
    """Issues and checks view tokens with one key."""

    key: bytes
    lifetime: float  # seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> ViewTokens:
        secret = settings.view_token_secret
        key = secret.get_secret_value().encode() if secret else _PROCESS_KEY
        return cls(key, settings.view_token_lifetime)

    def issue(self, patient_id: str, fhir_base: str, now: float | None = None) -> str:
        """A token for ``patient_id`` on ``fhir_base``, good for ``lifetime`` from now."""
        expiry = int((time.time() if now is None else now) + self.lifetime)
        return f"{expiry}.{self._signature(patient_id, fhir_base, expiry)}"

    def check(self, token: str, patient_id: str, fhir_base: str, now: float | None = None) -> None:
        """Return if ``token`` opens ``patient_id`` on ``fhir_base`` now; else raise
        ``ViewTokenRejected``. The signature is compared in constant time, before the
        expiry is looked at."""
        expiry_text, dot, signature = token.partition(".")
        if not dot or not expiry_text.isascii() or not expiry_text.isdigit():
            raise ViewTokenRejected(Rejection.MALFORMED)
        expiry = int(expiry_text)
        expected = self._signature(patient_id, fhir_base, expiry)
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise ViewTokenRejected(Rejection.SIGNATURE)
        if (time.time() if now is None else now) >= expiry:
            raise ViewTokenRejected(Rejection.EXPIRED)

    def _signature(self, patient_id: str, fhir_base: str, expiry: int) -> str:
        # JSON: no choice of patient id and server can make the same bytes as another one.
        message = json.dumps([_PURPOSE, patient_id, fhir_base.rstrip("/"), expiry])
        digest = hmac.new(self.key, message.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
