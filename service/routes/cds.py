"""CDS Hooks 2.0: discovery, the three hook services, and feedback.

A hook call is checked in this order, each failure an OperationOutcome: the client's JWT
(401, its ``aud`` must be the URL called), the service and hook (404/422), the
``fhirServer`` allow-list (403, before any connection), the prefetch completed from
``fhirServer`` where needed (412 when it cannot be). Then the patient is scored on the one
path the REST route uses, the prediction recorded, and cards returned. The
``fhirAuthorization`` token lives only in the FHIR client of this one call.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import FhirError
from service import metrics
from service.audit import AuditContext, audited
from service.cds.cards import cards_for
from service.cds.jwt import JwtRejected
from service.cds.models import CardsResponse, Discovery, FeedbackRequest, HookRequest
from service.cds.prefetch import CdsDataError, fhir_access, gather_record
from service.cds.services import SERVICES, CdsService, discovery
from service.explaining import explain_within
from service.outcomes import ServiceError
from service.predicting import (
    Fetched,
    fhir_failure,
    observe_scores,
    record_prediction,
    score_record,
)
from service.routes.predict import answer_body
from service.routes.view import view_link
from service.schemas import FeedbackStored, errors
from service.scoring import Scorer
from service.state import ServiceState, get_state, ready_scorer, ready_store
from service.store import FeedbackItem, Store, StoreUnavailable

router = APIRouter(prefix="/cds-services", tags=["cds-hooks"])
_BY_ID = {service.id: service for service in SERVICES}
ServiceId = Annotated[str, Path(description="A service id from discovery.", max_length=64)]
Authorization = Annotated[
    str | None, Header(description="Bearer <JWT> signed by a trusted CDS client.")
]


@router.get("", response_model=Discovery, response_model_by_alias=True)
async def services(scorer: Annotated[Scorer, Depends(ready_scorer)]) -> dict[str, Any]:
    """The CDS services offered (only those whose tasks the loaded model serves)."""
    return discovery(SERVICES, scorer.tasks)


@router.post(
    "/{service_id}",
    response_model=CardsResponse,
    response_model_by_alias=True,
    responses=errors(401, 403, 404, 412, 413, 422, 429, 502, 503, 504),
)
async def call(
    service_id: ServiceId,
    body: HookRequest,
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    scorer: Annotated[Scorer, Depends(ready_scorer)],
    _: Annotated[Store, Depends(ready_store)],
    authorization: Authorization = None,
) -> dict[str, Any]:
    """Score the patient in context and answer with a card per task at moderate or high
    risk (none when every risk is low)."""
    service = _service(service_id)
    actor = await _client(state, authorization, _called_url(state, request))
    patient_id = body.context.patient_id
    status = 200
    try:
        async with (
            audited(state, actor, f"cds:{service.id}", patient_id, scorer) as audit,
            state.admission.admit(),
        ):
            cards = await _cards(state, scorer, service, body, audit, _public_base(state, request))
    except ServiceError as exc:
        status = exc.status
        raise
    finally:
        metrics.CDS_REQUESTS.labels(service.id, str(status)).inc()
    return {"cards": cards}


@router.post(
    "/{service_id}/feedback",
    response_model=FeedbackStored,
    responses=errors(401, 404, 413, 422, 503),
)
async def feedback(
    service_id: ServiceId,
    body: FeedbackRequest,
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    store: Annotated[Store, Depends(ready_store)],
    authorization: Authorization = None,
) -> dict[str, int]:
    """Store what the clinician did with our cards. Idempotent: the same feedback item
    sent again is counted as a duplicate, not stored twice."""
    service = _service(service_id)
    actor = await _client(state, authorization, _called_url(state, request))
    items = [
        FeedbackItem(
            card=str(f.card),
            outcome=f.outcome,
            outcome_timestamp=f.outcome_timestamp,
            accepted_suggestions=[
                s.model_dump(by_alias=True) for s in f.accepted_suggestions or []
            ],
            override_reason=f.override_reason.model_dump(by_alias=True, exclude_none=True)
            if f.override_reason
            else None,
        )
        for f in body.feedback
    ]
    async with audited(state, actor, "feedback", None, None):
        try:
            result = await store.record_feedback(service.id, items)
        except StoreUnavailable as exc:
            metrics.STORE_ERRORS.labels("record_feedback").inc()
            raise ServiceError(503, "transient", "feedback could not be stored",
                               headers={"Retry-After": "5"}) from exc  # fmt: skip
    for f in body.feedback:
        metrics.CDS_FEEDBACK.labels(service.id, f.outcome).inc()
    return {"stored": result.stored, "duplicates": result.duplicates}


def _service(service_id: str) -> CdsService:
    service = _BY_ID.get(service_id)
    if service is None:
        raise ServiceError(404, "not-found", "no such CDS service; see GET /cds-services")
    return service


def _called_url(state: ServiceState, request: Request) -> str:
    """The URL the client called, as its JWT's ``aud`` must name it: under the configured
    public URL when the service sits behind a proxy."""
    return _public_base(state, request) + request.url.path


async def _client(state: ServiceState, authorization: str | None, url: str) -> str:
    """The verified CDS client's issuer (the audit trail's actor); 401 when the JWT fails."""
    if not state.settings.cds_require_jwt:
        return "cds:unauthenticated"
    try:
        claims = await state.verifier.verify(authorization, url)
    except JwtRejected as exc:
        metrics.JWT_REJECTIONS.labels(exc.reason.value).inc()
        raise ServiceError(401, "security", f"CDS client token refused ({exc.reason.value})",
                           headers={"WWW-Authenticate": "Bearer"}) from exc  # fmt: skip
    return f"cds:{claims.iss}"


async def _cards(
    state: ServiceState,
    scorer: Scorer,
    service: CdsService,
    body: HookRequest,
    audit: AuditContext,
    public_base: str,
) -> list[dict[str, Any]]:
    if body.hook != service.hook:
        raise ServiceError(422, "invalid", f"{service.id} answers {service.hook}, not {body.hook}")
    tasks = service.offered(scorer.tasks)
    if not tasks:
        raise ServiceError(404, "not-supported", "this model serves none of the service's tasks")
    started = time.perf_counter()
    try:
        access = fhir_access(body, state.settings.fhir_server_allow)
        if access is not None:
            audit.fhir_base = access[0]
        record, _ = await gather_record(
            body,
            body.context.patient_id,
            lambda: FhirClient(state.fhir_config(*access)) if access else None,
        )
    except CdsDataError as exc:
        raise ServiceError(exc.status, exc.code, str(exc)) from exc
    except FhirError as exc:
        raise fhir_failure(exc) from exc
    if access is not None:
        record.source = access[0]  # the operator's spelling of the server: stable cache keys
    fetched = Fetched(record, "prefetch", time.perf_counter() - started)
    scored, extra = await score_record(state, scorer, fetched, tasks, 0)
    answer = {**answer_body(scorer, scored), **extra}
    await record_prediction(state, scorer, record, f"cds:{service.id}", tasks, answer)
    observe_scores(scorer, scored)
    card_url = public_base + "/model/card"
    thresholds = scorer.artifact.config.thresholds
    carded = [t for t, p in scored.probabilities.items() if thresholds[t].level(p) != "low"]
    explained = await explain_within(
        state, scorer, scored, record, carded, datetime.now(UTC),
        state.settings.cds_explain_wait,
    ) if carded else {}  # fmt: skip
    view_url = view_link(state.settings, public_base, record.patient_id, record.source)
    cards = cards_for(service, scored, scorer.artifact, card_url, view_url,
                      explanations=explained or {})  # fmt: skip
    return [c.model_dump(mode="json", by_alias=True) for c in cards]


def _public_base(state: ServiceState, request: Request) -> str:
    """This service's base URL as clients reach it (cards link the model card under it)."""
    return (state.settings.public_url or str(request.base_url)).rstrip("/")
