"""``GET /metrics`` for Prometheus to scrape."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from service.metrics import metrics_payload

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> Response:
    """Every worker's metrics in the Prometheus text format; no label holds a patient id.

    A plain ``def`` so that FastAPI runs it in its thread pool: in multiprocess mode the
    collection reads every worker's files, which must not block the event loop."""
    body, content_type = metrics_payload()
    return Response(body, media_type=content_type)
