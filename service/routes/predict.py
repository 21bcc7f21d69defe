"""``POST /patients/{id}/predict``: read the patient from FHIR, score, answer."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path, Query

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import FhirError, FhirNotFound, FhirTimeout
from fhir_adapter.normalize import build_timeline
from model.tasks import Task
from service.outcomes import ServiceError
from service.scoring import Scored, Scorer
from service.state import ServiceState, get_state, ready_scorer, require_api_key

router = APIRouter(
    prefix="/patients", tags=["predictions"], dependencies=[Depends(require_api_key)]
)
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR's id datatype


@router.post("/{patient_id}/predict")
async def predict(
    patient_id: Annotated[str, Path(description="The FHIR Patient id.")],
    state: Annotated[ServiceState, Depends(get_state)],
    scorer: Annotated[Scorer, Depends(ready_scorer)],
    tasks: Annotated[
        str | None, Query(description="Comma-separated task names; default: every served task.")
    ] = None,
    forecast: Annotated[int, Query(ge=0, description="Next events to forecast.")] = 0,
) -> dict[str, Any]:
    """Probabilities and risk levels for the requested tasks, a forecast of the next events,
    the model's identity, facts about the data used, and timings."""
    if not _FHIR_ID.match(patient_id):
        raise ServiceError(422, "invalid", "the patient id is not a FHIR id")
    if forecast > state.settings.max_forecast:
        raise ServiceError(422, "invalid", f"forecast is at most {state.settings.max_forecast}")
    wanted = _parse_tasks(tasks, scorer.tasks)
    started = time.perf_counter()
    try:
        async with FhirClient(state.fhir_config()) as fhir:
            record = await fhir.fetch_patient(patient_id)
    except FhirNotFound as exc:
        raise ServiceError(404, "not-found", "patient not found on the FHIR server") from exc
    except FhirTimeout as exc:
        raise ServiceError(504, "timeout", "the FHIR server did not answer in time") from exc
    except FhirError as exc:
        raise ServiceError(
            502, "exception", f"the FHIR server failed: {exc.status or 'no answer'}"
        ) from exc
    fetched = time.perf_counter()
    timeline = build_timeline(record)
    now = datetime.now(UTC)
    try:
        scored = await anyio.to_thread.run_sync(scorer.score, timeline, wanted, forecast, now)
    except ValueError as exc:
        raise ServiceError(422, "processing", f"cannot score this patient: {exc}") from exc
    return _answer(scorer, scored, {"fetch_s": fetched - started, **scored.timings})


def _parse_tasks(tasks: str | None, served: tuple[Task, ...]) -> list[Task]:
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


def _answer(scorer: Scorer, scored: Scored, timings: dict[str, float]) -> dict[str, Any]:
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
            {"token": step.token, "code": step.code, "lab_bin": step.lab_bin,
             "probability": step.probability,
             "candidates": [{"token": t, "probability": p} for t, p in step.candidates]}
            for step in scored.forecast
        ],
        "data": {
            "resources": scored.facts.resources, "dropped": scored.facts.dropped,
            "visits": scored.facts.visits, "events": scored.facts.events,
            "tokens": scored.facts.tokens, "truncated": scored.facts.truncated,
            "last_updated": scored.facts.last_updated.isoformat()
            if scored.facts.last_updated else None,
        },
        "timings": timings,
    }  # fmt: skip
