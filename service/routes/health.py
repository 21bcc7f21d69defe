"""Liveness, readiness (also under ``/v2`` as KServe's open inference protocol names them),
and the served model's identity, card and source attributes."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from service import metrics
from service.scoring import Scorer
from service.state import ServiceState, get_state, ready_scorer

router = APIRouter(tags=["operations"])


@router.get("/health/live")
@router.get("/v2/health/live")
async def live() -> dict[str, str]:
    """The process answers."""
    return {"status": "live"}


@router.get("/health/ready")
@router.get("/v2/health/ready")
async def ready(state: Annotated[ServiceState, Depends(get_state)]) -> JSONResponse:
    """200 when the model is loaded and the store open; 503 with the reason otherwise. The
    cache is a detail, not a condition: without Redis the service answers from process
    memory and says so here."""
    checks = {**state.checks, "cache": await state.cache.check()}
    metrics.CACHE_DEGRADED.set(1 if state.cache.degraded else 0)
    if state.not_ready is not None:
        return JSONResponse(
            {"status": "not ready", "reason": state.not_ready, "checks": checks},
            status_code=503,
        )
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/model")
async def model_info(scorer: Annotated[Scorer, Depends(ready_scorer)]) -> dict[str, Any]:
    """Name, version, sha256, tasks served with their risk thresholds, and test metrics."""
    artifact = scorer.artifact
    metrics = artifact.metrics
    return {
        "name": artifact.config.name,
        "version": artifact.version,
        "sha256": artifact.sha256,
        "max_length": artifact.config.max_length,
        "tasks": {
            task.value: {
                "thresholds": vars(artifact.config.thresholds[task]),
                "test": metrics.get("tasks", {}).get(task.value),
            }
            for task in artifact.config.tasks
        },
        "not_served": metrics.get("not_trained", {}),
    }


@router.get("/model/card", response_class=PlainTextResponse)
async def model_card(scorer: Annotated[Scorer, Depends(ready_scorer)]) -> str:
    """The model card (Markdown)."""
    return (scorer.artifact.path / "model_card.md").read_text()


@router.get("/model/source-attributes")
async def source_attributes(scorer: Annotated[Scorer, Depends(ready_scorer)]) -> Any:
    """The ONC HTI-1 predictive decision support source attributes."""
    return json.loads((scorer.artifact.path / "source_attributes.json").read_text())
