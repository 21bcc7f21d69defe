"""Response shapes of the REST routes, so the OpenAPI document says exactly what comes
back (and FastAPI checks every answer against it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.outcomes import FHIR_JSON


class Issue(BaseModel):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str = Field(description="A FHIR issue-type code (not-found, invalid, timeout...).")
    diagnostics: str


class OperationOutcome(BaseModel):
    """Every error: a FHIR OperationOutcome."""

    resourceType: Literal["OperationOutcome"]  # noqa: N815  (FHIR's name)
    issue: list[Issue]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses."""
    meaning = {
        401: "No valid credentials.",
        403: "A fhirServer outside the allow-list.",
        404: "Unknown patient or service.",
        412: "The prefetch lacks data and no fhirServer was named to read it from.",
        413: "Request body too large.",
        422: "Invalid parameters or a record that cannot be scored.",
        429: "The inference queue is full; retry after Retry-After seconds.",
        502: "The FHIR server failed.",
        503: "Not ready (model or store), or the store could not record the answer.",
        504: "The FHIR server did not answer in time.",
    }
    # Errors go out as application/fhir+json, so the document must say so (FastAPI adds the
    # model's application/json entry beside it).
    return {
        s: {
            "model": OperationOutcome,
            "description": meaning[s],
            "content": {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}},
        }
        for s in statuses
    }


class Model(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="Of the artifact's manifest: which weights answered.")


class TaskScore(BaseModel):
    probability: float = Field(ge=0, le=1)
    risk: Literal["low", "moderate", "high"] = Field(
        description="From the artifact's thresholds for this task."
    )


class Candidate(BaseModel):
    token: str
    display: str | None = Field(description="How the training data named the code.")
    probability: float


class ForecastEvent(BaseModel):
    token: str = Field(description="SYSTEM|code, with #bin for a lab value bin.")
    code: str
    display: str | None = Field(description="How the training data named the code.")
    lab_bin: int | None = Field(description="0 (lowest) to 4 (highest) for labs.")
    probability: float
    candidates: list[Candidate]


class DataFacts(BaseModel):
    resources: dict[str, int] = Field(description="Resources read, by type.")
    dropped: dict[str, int] = Field(description="Resources left out, by type:reason.")
    visits: int
    events: int
    tokens: int
    truncated: bool = Field(description="Whether the oldest history fell outside the window.")
    last_updated: str | None = Field(description="Newest meta.lastUpdated seen.")


class CacheUse(BaseModel):
    record: Literal["cold", "incremental", "prefetch", "fresh-cache"] = Field(
        description="Where the record came from: cold (a whole FHIR read), incremental (the "
        "cached record and what the FHIR server changed since), prefetch (the CDS request), "
        "fresh-cache (the cached record alone, confirmed by the FHIR server less than "
        "EHRMAMBA_FHIR_FRESHNESS seconds ago; changes since then are not in it)."
    )
    state: Literal["miss", "hit", "extended"]
    scanned_tokens: int = Field(description="Tokens this call scanned (0: fully cached).")


class ExplainedEvent(BaseModel):
    token: str = Field(description="SYSTEM|code, with #bin for a lab value bin.")
    code: str
    display: str | None = Field(description="How the training data named the code.")
    kind: Literal["lab", "medication", "procedure", "event"]
    time: str = Field(description="When it happened (ISO 8601).")
    visit: int = Field(description="Visit order within the model's window, 1 = first.")
    attribution: float = Field(
        description="Its share of probability - baseline_probability (integrated gradients)."
    )
    words: str = Field(
        description='For a reader: "Creatinine high, 3 days ago (2024-03-02)". Lab levels are '
        "quintiles of the training population's values, not reference ranges."
    )


class TaskExplanation(BaseModel):
    probability: float = Field(description="The probability explained (the task's score).")
    baseline_probability: float = Field(
        description="The model's probability for a record with no events (every position "
        "padding): attributions share out the difference."
    )
    completeness_gap: float = Field(
        description="Sum of all attributions minus the difference: the integration error."
    )
    steps: int = Field(description="Integration steps used.")
    contributing: list[ExplainedEvent] = Field(description="Events that raised it most.")
    protective: list[ExplainedEvent] = Field(description="Events that lowered it most.")


class Prediction(BaseModel):
    id: int = Field(description="The stored prediction's id.")
    model: Model
    predictions: dict[str, TaskScore]
    not_scored: dict[str, str] = Field(description="Task -> why it was not scored.")
    forecast: list[ForecastEvent]
    data: DataFacts
    cache: CacheUse
    timings: dict[str, float] = Field(
        description="Seconds: fetch, tokenize, queue, score (and explain, when asked)."
    )
    explanations: dict[str, TaskExplanation] | None = Field(
        default=None, description="With explain=true: per scored task, the events behind it."
    )


class StoredPrediction(BaseModel):
    id: int
    created_at: str
    source: str = Field(description="api, or cds:<service id>.")
    model: Model
    tasks: list[str]
    predictions: dict[str, TaskScore]
    not_scored: dict[str, str]
    forecast: list[ForecastEvent]
    data: DataFacts


class History(BaseModel):
    patient: str
    predictions: list[StoredPrediction]


class FeedbackStored(BaseModel):
    stored: int = Field(description="Feedback items stored by this call.")
    duplicates: int = Field(description="Items already stored earlier (sent again).")
