"""Every setting of the service in one typed object, read once from the environment
(``EHRMAMBA_`` prefix) or an ``.env`` file. Nothing else in the service reads the
environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration. Durations are seconds."""

    model_config = SettingsConfigDict(env_prefix="EHRMAMBA_", env_file=".env", extra="ignore")

    model_path: Path = Field(
        default=Path("models/compact"), description="The artifact folder to serve."
    )
    fhir_base_url: str | None = Field(
        default=None, description="The FHIR server patients are read from."
    )
    fhir_token: SecretStr | None = Field(
        default=None, description="Bearer token for the FHIR server, if it needs one."
    )
    fhir_timeout: float = Field(default=30.0, gt=0)
    fhir_retries: int = Field(default=3, ge=0)
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Keys accepted in the X-API-Key header on /patients routes; empty: open.",
    )
    max_forecast: int = Field(default=20, ge=0, description="Largest forecast=k accepted.")
