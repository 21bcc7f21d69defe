"""Every setting of the service in one typed object, read once from the environment
(``EHRMAMBA_`` prefix) or an ``.env`` file. Nothing else in the service reads the
environment. ``DATABASE_URL`` and ``REDIS_URL`` are also read without the prefix, as
container platforms name them. Lists and nested objects are given as JSON, e.g.
``EHRMAMBA_FHIR_SERVER_ALLOW='["https://fhir.hospital.org/r4"]'``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.explain import DEFAULT_STEPS


class CdsIssuer(BaseModel):
    """A CDS client (an EHR) trusted to call the CDS services.

    Its public keys come from ``jwks_file``, or from a JWT's ``jku`` header when that URL
    is one of ``jku`` here (exact match); never from an arbitrary URL in a token.
    """

    iss: str = Field(description="The issuer, exactly as in the JWT's iss claim.")
    jwks_file: Path | None = Field(default=None, description="A JSON Web Key Set file.")
    jku: list[str] = Field(default_factory=list, description="JWKS URLs allowed in jku.")


class Settings(BaseSettings):
    """Service configuration. Durations are seconds, sizes bytes."""

    model_config = SettingsConfigDict(
        env_prefix="EHRMAMBA_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- model and FHIR ----------------------------------------------------------------------
    model_path: Path = Field(
        default=Path("models/compact"), description="The artifact folder to serve."
    )
    fhir_base_url: str | None = Field(
        default=None, description="The FHIR server /patients routes read from."
    )
    fhir_token: SecretStr | None = Field(
        default=None, description="Bearer token for that FHIR server, if it needs one."
    )
    fhir_timeout: float = Field(default=30.0, gt=0, description="Per FHIR request.")
    fhir_retries: int = Field(
        default=3, ge=0, description="Retries of a FHIR read on 429, 502-504 or no connection."
    )
    fhir_freshness: float = Field(
        default=0.0,
        ge=0,
        description="Seconds after the FHIR server last confirmed a cached record within which "
        "predict answers from it without asking the server (cache.record = fresh-cache). "
        "0: always ask.",
    )
    max_forecast: int = Field(default=20, ge=0, description="Largest forecast=k accepted.")
    explain_steps: int = Field(
        default=DEFAULT_STEPS,
        ge=1,
        le=256,
        description="Integration steps of an explanation (docs/benchmarks.md, "
        '"Explanations": fewer is faster and less exact).',
    )
    explain_top: int = Field(
        default=5, ge=1, le=50, description="Events listed per task and direction by explain=true."
    )
    cds_explain_wait: float = Field(
        default=0.25,
        ge=0,
        description="Seconds a CDS call waits for the reasons on its cards; beyond it the "
        "cards go out without them, and they are finished in the background for the next "
        "call and the patient view. Small by default: a first explanation takes seconds, "
        "and a hook must answer within the EHR's patience (p95 target 500 ms).",
    )
    public_url: str | None = Field(
        default=None,
        description="This service's external base URL (behind a proxy): CDS JWTs' aud is "
        "checked against it and cards link the model card under it. Default: the URL the "
        "request came to.",
    )

    # --- storage -----------------------------------------------------------------------------
    database_url: str = Field(
        default="sqlite:///var/ehrmamba.db",
        validation_alias=AliasChoices("EHRMAMBA_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL of the prediction, feedback and audit store "
        "(postgresql+psycopg://... in production).",
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("EHRMAMBA_REDIS_URL", "REDIS_URL"),
        description="Shared cache for several replicas; unset: in-process LRU.",
    )
    cache_ttl: float = Field(default=24 * 3600.0, gt=0, description="Life of a cached patient.")
    cache_max_entries: int = Field(
        default=2_000,
        ge=1,
        description="In-process LRU size in entries (three per patient: about 0.3 MiB of scan "
        "state, a median 0.14 MiB of record and a few bytes of when it was confirmed; 2,000 "
        "entries hold about 0.3 GiB).",
    )
    record_memo: int = Field(
        default=256,
        ge=0,
        description="Decoded records and their timelines each process keeps (by digest of "
        "the cached bytes), so a call whose record has not changed skips decoding and "
        "normalising it; 0: off.",
    )
    cache_key_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key that hides patient ids in cache keys; replicas sharing one "
        "Redis must share it. Unset: a random key per process.",
    )

    # --- access ------------------------------------------------------------------------------
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys accepted in X-API-Key (or as a Bearer token) on /patients "
        "routes; empty: open.",
    )
    cds_issuers: list[CdsIssuer] = Field(
        default_factory=list, description="CDS clients trusted to call /cds-services."
    )
    cds_require_jwt: bool = Field(
        default=True, description="Refuse CDS calls without a valid client JWT."
    )
    cds_jwt_leeway: float = Field(default=30.0, ge=0, description="Clock skew allowed.")
    fhir_server_allow: list[str] = Field(
        default_factory=list,
        description="FHIR base URLs a CDS request's fhirServer may name; any other is "
        "refused before a connection is made.",
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="Largest request body (CDS prefetch)."
    )
    view_token_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key of the signed links to /patients/{id}/view that CDS cards "
        "carry; replicas must share it. Unset: a random key per process (ehrmamba serve "
        "draws one for all its workers).",
    )
    view_token_lifetime: float = Field(
        default=15 * 60.0, gt=0, le=24 * 3600.0, description="How long a view link works."
    )

    # --- inference batching ------------------------------------------------------------------
    engine_step: Literal["onnxruntime", "pytorch"] = Field(
        default="pytorch",
        description="What runs a forecast's one-token steps (task tokens and closing tokens "
        "ride in the scan): PyTorch, the same one compiled call as an incremental update "
        "(model/packed.py), or onnxruntime with the artifact's exported step.onnx. They "
        "are equally fast (ehrmamba bench model: recurrent_step, six_tasks_forecast; "
        "ehrmamba bench warm-path: engine_hit) and agree within 1e-4; an artifact without "
        "step.onnx uses PyTorch.",
    )
    engine_threads: int = Field(
        default=1,
        ge=1,
        description="CPU threads per worker process for the model (torch and numba). One "
        "per worker scales out with --workers and does not stall when other processes hold "
        "the cores; more helps only long cold scans on an otherwise idle machine.",
    )
    batch_max_size: int = Field(default=16, ge=1, description="Patients per engine call.")
    batch_max_wait: float = Field(
        default=0.005, ge=0, description="How long a request waits for others to join it."
    )
    queue_max: int = Field(
        default=64, ge=1, description="Requests waiting for the engine before 429."
    )
    max_in_flight: int = Field(
        default=32,
        ge=1,
        description="Requests one worker works on at once (FHIR reads, scoring, recording); "
        "beyond it new ones get 429 at once instead of waiting until callers time out.",
    )
