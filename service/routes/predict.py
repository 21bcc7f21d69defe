"""``POST /patients/{id}/predict`` and ``GET /patients/{id}/predictions``."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from fhir_adapter.references import FHIR_ID_MAX, FHIR_ID_PATTERN
from model.tasks import Task
from service.audit import audited
from service.explaining import explain_cached, explanation_json
from service.outcomes import ServiceError
from service.predicting import (
    fetch_record,
    observe_scores,
    record_prediction,
    score_record,
)
from service.schemas import History, Prediction, errors
from service.scoring import Scored, Scorer
from service.state import ServiceState, get_state, ready_scorer, ready_store, require_api_key
from service.store import Store, StoreUnavailable

router = APIRouter(prefix="/patients", tags=["predictions"])
_FHIR_ID = re.compile(FHIR_ID_PATTERN)
PatientId = Annotated[str, Path(description="The FHIR Patient id.", max_length=64)]


@router.post(
    "/{patient_id}/predict",
    response_model=Prediction,
    responses=errors(401, 404, 413, 422, 429, 502, 503, 504),
)
async def predict(
    patient_id: PatientId,
    state: Annotated[ServiceState, Depends(get_state)],
    scorer: Annotated[Scorer, Depends(ready_scorer)],
    _: Annotated[Store, Depends(ready_store)],
    actor: Annotated[str, Depends(require_api_key)],
    tasks: Annotated[
        str | None, Query(description="Comma-separated task names; default: every served task.")
    ] = None,
    forecast: Annotated[int, Query(ge=0, description="Next events to forecast.")] = 0,
    explain: Annotated[
        bool,
        Query(
            description="Also the events that raised and lowered each score (integrated "
            "gradients; seconds per task, not milliseconds)."
        ),
    ] = False,
) -> dict[str, Any]:
    """Probabilities and risk levels for the requested tasks, a forecast of the next events,
    the model's identity, facts about the data used, what the cache contributed, timings,
    and the id under which the prediction was recorded; with ``explain=true``, the events
    behind each score."""
    async with (
        audited(state, actor, "predict", patient_id, scorer) as audit,
        state.admission.admit(),
    ):
        check_id(patient_id)
        if forecast > state.settings.max_forecast:
            raise ServiceError(422, "invalid", f"forecast is at most {state.settings.max_forecast}")
        wanted = parse_tasks(tasks, scorer.tasks)
        fhir = state.fhir_client()
        audit.fhir_base = fhir.base_url
        fetched = await fetch_record(state, fhir, patient_id)
        scored, extra = await score_record(state, scorer, fetched, wanted, forecast)
        answer = {**answer_body(scorer, scored), **extra}
        if explain:
            started = time.perf_counter()
            explained = await explain_cached(
                state, scorer, scored, fetched.record, wanted, datetime.now(UTC)
            )
            top = state.settings.explain_top
            answer["explanations"] = {
                task.value: explanation_json(e, top) for task, e in explained.items()
            }
            answer["timings"]["explain_s"] = time.perf_counter() - started
        answer["id"] = await record_prediction(state, scorer, fetched.record, "api", wanted, answer)
        observe_scores(scorer, scored)
        return answer


@router.get("/{patient_id}/predictions", response_model=History, responses=errors(401, 422, 503))
async def predictions(
    patient_id: PatientId,
    state: Annotated[ServiceState, Depends(get_state)],
    store: Annotated[Store, Depends(ready_store)],
    actor: Annotated[str, Depends(require_api_key)],
    limit: Annotated[int, Query(ge=1, le=500, description="Newest first, at most.")] = 50,
) -> dict[str, Any]:
    """The recorded predictions for this patient on the configured FHIR server, newest
    first."""
    async with audited(state, actor, "history", patient_id, None):
        check_id(patient_id)
        try:
            rows = await store.predictions(state.settings.fhir_base_url, patient_id, limit)
        except StoreUnavailable as exc:
            raise ServiceError(503, "transient", "the prediction store is unavailable",
                               headers={"Retry-After": "5"}) from exc  # fmt: skip
        return {
            "patient": patient_id,
            "predictions": [
                {"id": r.id, "created_at": r.created_at.isoformat(), "source": r.source,
                 "model": {"name": r.model_name, "version": r.model_version,
                           "sha256": r.model_sha256},
                 "tasks": r.tasks, **r.results, "data": r.data}
                for r in rows
            ],
        }  # fmt: skip


def check_id(patient_id: str) -> None:
    """422 for a path id that is not a FHIR id (before it reaches a FHIR URL or the cache)."""
    if len(patient_id) > FHIR_ID_MAX or not _FHIR_ID.match(patient_id):
        raise ServiceError(422, "invalid", "the patient id is not a FHIR id")


def parse_tasks(tasks: str | None, served: tuple[Task, ...]) -> list[Task]:
    """The tasks named in a ``tasks=`` parameter (all served ones when absent)."""
    if tasks is None:
        return list(served)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    known = {t.value: t for t in Task}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ServiceError(422, "invalid", f"unknown tasks {unknown}; choose from "
                           f"{[t.value for t in served]}")  # fmt: skip
    not_served = [n for n in names if known[n] not in served]
    if not_served:
        raise ServiceError(422, "not-supported", f"this model does not serve {not_served} "
                           "(not trained: see its model card)")  # fmt: skip
    return list(dict.fromkeys(known[n] for n in names))


def answer_body(scorer: Scorer, scored: Scored) -> dict[str, Any]:
    """The model's identity, the scores with risk levels, the forecast and the data facts."""
    artifact = scorer.artifact
    thresholds = artifact.config.thresholds
    return {
        "model": {"name": artifact.config.name, "version": artifact.version,
                  "sha256": artifact.sha256},
        "predictions": {
            task.value: {"probability": p, "risk": thresholds[task].level(p)}
            for task, p in scored.probabilities.items()
        },
        "not_scored": {task.value: reason for task, reason in scored.not_scored.items()},
        "forecast": [
            {"token": step.token, "code": step.code, "display": artifact.display(step.token),
             "lab_bin": step.lab_bin, "probability": step.probability,
             "candidates": [{"token": t, "display": artifact.display(t), "probability": p}
                            for t, p in step.candidates]}
            for step in scored.forecast
        ],
        "data": {
            "resources": scored.facts.resources, "dropped": scored.facts.dropped,
            "visits": scored.facts.visits, "events": scored.facts.events,
            "tokens": scored.facts.tokens, "truncated": scored.facts.truncated,
            "last_updated": scored.facts.last_updated.isoformat()
            if scored.facts.last_updated else None,
        },
    }  # fmt: skip
