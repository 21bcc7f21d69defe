"""``GET /patients/{id}/view``: one patient's risks, forecast, and the events behind each
risk on a timeline, as a page a clinician opens from a CDS card's link.

Access is an API key, as on the other ``/patients`` routes, or the link's own signed
``token`` (``service.view_token``): a browser following a card's link cannot send a key.
The record is fetched, scored and recorded (source ``view``) on the predict path. The head
of the page goes out as soon as the record is scored and the reasons follow when the
explanation is done, seconds to a minute later, computed off the event loop. Errors are
HTML pages with the status the API would give, since a browser shows them. The page loads
nothing from elsewhere; its CSP allows only its own nonce-marked style and script.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from fhir_adapter.record import PatientRecord
from model.tasks import Task
from service.audit import audited
from service.explaining import TaskExplanation, explain_cached
from service.outcomes import ServiceError
from service.predicting import fetch_record, observe_scores, record_prediction, score_record
from service.routes.predict import answer_body, check_id, parse_tasks
from service.scoring import Scored, Scorer
from service.settings import Settings
from service.state import ServiceState, get_state, ready_scorer, ready_store, require_api_key
from service.view.page import Head, render_error, render_head, render_reasons
from service.view_token import ViewTokenRejected, ViewTokens

log = logging.getLogger(__name__)
router = APIRouter(prefix="/patients", tags=["patient view"])
FORECAST = 5  # next events on the page (at most the service's max_forecast)
_HTML = {"text/html": {"schema": {"type": "string"}}}
_HINTS = {
    401: "The link has expired or does not open this patient. Open the patient's card in "
    "the EHR again for a fresh link, or call with an API key.",
    404: "The FHIR server has no patient with this id.",
    429: "The service is busy: reload in a few seconds.",
    503: "The service is not ready: reload in a few seconds.",
}


@router.get(
    "/{patient_id}/view",
    response_class=HTMLResponse,
    responses={
        status: {"description": meaning, "content": _HTML}
        for status, meaning in (
            (401, "No valid API key or view token."),
            (404, "Unknown patient."),
            (422, "Invalid parameters or a record that cannot be scored."),
            (429, "The inference queue is full; reload in a few seconds."),
            (502, "The FHIR server failed."),
            (503, "Not ready, or the answer could not be recorded."),
            (504, "The FHIR server did not answer in time."),
        )
    },
)
async def view(
    patient_id: Annotated[str, Path(description="The FHIR Patient id.")],
    state: Annotated[ServiceState, Depends(get_state)],
    token: Annotated[
        str | None,
        Query(description="A signed view token from a CDS card's link, instead of an API key."),
    ] = None,
    tasks: Annotated[
        str | None, Query(description="Comma-separated task names; default: every served task.")
    ] = None,
    x_api_key: Annotated[str | None, Header(description="An API key, if keys are set.")] = None,
    authorization: Annotated[str | None, Header(description="Or: Bearer <API key>.")] = None,
) -> Response:
    """An HTML page: the risks of every scored task against their thresholds, a forecast of
    the next events, and, once computed (seconds to a minute), a timeline of the record
    coloured by what raised or lowered each risk, with the top events in words. Records
    the prediction with source ``view``."""
    nonce = secrets.token_urlsafe(16)
    try:
        scorer = ready_scorer(state)
        ready_store(state)
        fhir = state.fhir_client()
        if token is None:
            actor = require_api_key(state, x_api_key, authorization)
        else:
            actor = _check_token(state.settings, token, patient_id, fhir.base_url)
        async with (
            audited(state, actor, "view", patient_id, scorer) as audit,
            state.admission.admit(),
        ):
            check_id(patient_id)
            wanted = parse_tasks(tasks, scorer.tasks)
            audit.fhir_base = fhir.base_url
            fetched = await fetch_record(state, fhir, patient_id)
            forecast = min(FORECAST, state.settings.max_forecast)
            scored, extra = await score_record(state, scorer, fetched, wanted, forecast)
            answer = {**answer_body(scorer, scored), **extra}
            await record_prediction(state, scorer, fetched.record, "view", wanted, answer)
            observe_scores(scorer, scored)
    except ServiceError as exc:
        page = render_error(exc.status, exc.diagnostics, _HINTS.get(exc.status, ""), nonce)
        return HTMLResponse(page, exc.status, headers={**exc.headers, **page_headers(nonce)})
    explained = tuple(t for t in wanted if t in scored.probabilities)
    head = Head(patient_id, nonce, "../../model/card", explained)
    return StreamingResponse(
        _page(state, scorer, scored, fetched.record, wanted, head),
        media_type="text/html; charset=utf-8",
        headers=page_headers(nonce),
    )


async def _page(
    state: ServiceState,
    scorer: Scorer,
    scored: Scored,
    record: PatientRecord,
    tasks: Sequence[Task],
    head: Head,
) -> AsyncIterator[str]:
    yield render_head(head, scorer.artifact, scored, tasks)
    explanations: Mapping[Task, TaskExplanation] = {}
    failed = None
    if head.explaining:
        try:
            explanations = await explain_cached(
                state, scorer, scored, record, head.explaining, datetime.now(UTC)
            )
        except Exception:  # the head is out with status 200: finish the page, saying so
            log.exception("the patient view's explanation failed")
            failed = "The explanation failed on the server."
    yield render_reasons(head.nonce, explanations, state.settings.explain_top, failed)


def _check_token(settings: Settings, token: str, patient_id: str, fhir_base: str) -> str:
    """The audit trail's actor for a valid view token; 401 otherwise."""
    try:
        ViewTokens.from_settings(settings).check(token, patient_id, fhir_base)
    except ViewTokenRejected as exc:
        raise ServiceError(401, "security", f"view link refused ({exc.reason.value})",
                           headers={"WWW-Authenticate": "ApiKey"}) from exc  # fmt: skip
    return "view-link"


def page_headers(nonce: str) -> dict[str, str]:
    """A patient's data must not be cached, framed by strangers' scripts, or leak its
    link's token through a Referer; the CSP lets only this response's own inline style and
    script run and lets nothing load."""
    return {
        "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; "
        f"script-src 'nonce-{nonce}'; img-src data:; base-uri 'none'; form-action 'none'",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }


def view_link(settings: Settings, public_base: str, patient_id: str, fhir_base: str) -> str | None:
    """The URL a CDS card links to: this patient's view with a fresh signed token. None when
    the record came from another FHIR server than the configured one the view reads (the
    link would show a different patient of the same id there, or none)."""
    configured = settings.fhir_base_url
    if configured is None or configured.rstrip("/") != fhir_base.rstrip("/"):
        return None
    token = ViewTokens.from_settings(settings).issue(patient_id, configured)
    path = f"/patients/{quote(patient_id, safe='')}/view"
    return f"{public_base}{path}?{urlencode({'token': token})}"
