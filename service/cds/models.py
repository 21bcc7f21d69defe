"""CDS Hooks 2.0 request and response bodies as pydantic models, so that FastAPI validates
what EHRs send and the OpenAPI document shows what they get.

Python names are snake_case; on the wire every field carries the spec's camelCase name
(``hookInstance``, ``overrideReasons``), except ``fhirAuthorization``'s OAuth fields, which
the spec spells ``access_token`` etc. The access token is a ``SecretStr``: it prints as
``**********`` in reprs and dumps, the models that hold it keep their input out of
validation error texts, and it is only unwrapped to build the FHIR client's bearer
credential. (``ValidationError.errors()`` and FastAPI's ``RequestValidationError.body``
still carry the raw input: never log those.)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)
from pydantic.alias_generators import to_camel

from fhir_adapter.references import FHIR_ID_MAX, FHIR_ID_PATTERN

Hook = Literal["patient-view", "encounter-start", "encounter-discharge"]
FhirId = Annotated[
    str, Field(pattern=FHIR_ID_PATTERN, max_length=FHIR_ID_MAX, description="A FHIR id.")
]
_ENCOUNTER_HOOKS = ("encounter-start", "encounter-discharge")


class CdsModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class Coding(CdsModel):
    """CDS Hooks' trimmed FHIR Coding."""

    code: str = Field(min_length=1)
    system: str = Field(min_length=1)
    display: str | None = Field(default=None, min_length=1)


# --- the hook call -----------------------------------------------------------------------


class FhirAuthorization(BaseModel):
    """An OAuth 2.0 bearer token for ``fhirServer``, issued to this service for one call."""

    model_config = ConfigDict(hide_input_in_errors=True)

    access_token: SecretStr = Field(min_length=1)
    token_type: Literal["Bearer"]
    expires_in: int = Field(ge=0)
    scope: str
    subject: str
    patient: FhirId | None = None


class HookContext(CdsModel):
    """The fields of the three hooks' contexts this service reads; others are kept."""

    model_config = ConfigDict(extra="allow")

    user_id: str = Field(min_length=1)
    patient_id: FhirId
    encounter_id: FhirId | None = None


class HookRequest(CdsModel):
    model_config = ConfigDict(hide_input_in_errors=True)

    hook: Hook
    hook_instance: UUID
    fhir_server: AnyHttpUrl | None = None
    fhir_authorization: FhirAuthorization | None = None
    context: HookContext
    prefetch: dict[str, dict[str, Any] | None] | None = Field(
        default=None,
        description="Prefetch key -> the resource or searchset Bundle the client read, or "
        "null when the client has no data for that key.",
    )

    @model_validator(mode="after")
    def _spec_conditions(self) -> HookRequest:
        if self.fhir_authorization is not None and self.fhir_server is None:
            raise ValueError("fhirServer is required when fhirAuthorization is given")
        if self.hook in _ENCOUNTER_HOOKS and self.context.encounter_id is None:
            raise ValueError(f"context.encounterId is required for {self.hook}")
        return self


# --- feedback ----------------------------------------------------------------------------


class AcceptedSuggestion(CdsModel):
    id: str = Field(min_length=1)


class OverrideReason(CdsModel):
    reason: Coding | None = None
    user_comment: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _not_empty(self) -> OverrideReason:
        if self.reason is None and self.user_comment is None:
            raise ValueError("overrideReason needs a reason, a userComment or both")
        return self


class Feedback(CdsModel):
    card: UUID = Field(description="The card's uuid, as this service issued it.")
    outcome: Literal["accepted", "overridden"]
    accepted_suggestions: list[AcceptedSuggestion] | None = Field(default=None, min_length=1)
    override_reason: OverrideReason | None = None
    outcome_timestamp: AwareDatetime

    @model_validator(mode="after")
    def _outcome_fields(self) -> Feedback:
        if self.outcome == "accepted":
            if self.accepted_suggestions is None:
                raise ValueError("an accepted outcome needs acceptedSuggestions")
            if self.override_reason is not None:
                raise ValueError("overrideReason belongs to an overridden outcome only")
        elif self.accepted_suggestions is not None:
            raise ValueError("acceptedSuggestions belong to an accepted outcome only")
        return self


class FeedbackRequest(CdsModel):
    feedback: list[Feedback] = Field(min_length=1)


# --- responses ---------------------------------------------------------------------------


class Source(CdsModel):
    label: str
    url: str = Field(description="The model card.")
    topic: Coding = Field(description="The task the card is about.")


class Link(CdsModel):
    """A link a card offers (CDS Hooks 2.0): ``absolute`` opens ``url`` in a browser,
    ``smart`` launches a SMART app. The spec's optional ``appContext`` (for SMART apps) is
    left out: this service offers no SMART app, and a null there is not a string."""

    label: str = Field(min_length=1)
    url: str
    type: Literal["absolute", "smart"]


class Card(CdsModel):
    uuid: UUID
    summary: str = Field(max_length=139)
    detail: str = Field(description="GitHub Flavored Markdown.")
    indicator: Literal["info", "warning", "critical"]
    source: Source
    override_reasons: list[Coding]
    links: list[Link] = Field(
        default_factory=list, description="The patient's view page (timeline and reasons)."
    )


class CardsResponse(CdsModel):
    cards: list[Card]


class ServiceDescription(CdsModel):
    hook: Hook
    title: str
    description: str
    id: str
    prefetch: dict[str, str]
    usage_requirements: str


class Discovery(CdsModel):
    services: list[ServiceDescription]
