"""Every Prometheus metric of the service, defined once here so that a name, its labels and
its help text cannot drift between the places that record it.

Under uvicorn with several workers each process counts on its own; prometheus_client then
keeps values in memory-mapped files (``PROMETHEUS_MULTIPROC_DIR``) and ``/metrics`` sums
them, whichever worker answers the scrape. No label ever holds a patient id: HTTP requests
are labelled by route template, never by path.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# 1 ms .. 10 s: a cached health check at the low end, a cold FHIR fetch and scan at the top.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "ehrmamba_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "ehrmamba_http_request_duration_seconds",
    "Time from receiving an HTTP request to the end of its response.",
    ["route", "method"],
    buckets=SECONDS,
)

INFERENCE_STAGE = Histogram(
    "ehrmamba_inference_stage_seconds",
    "Time spent in one stage of a prediction "
    "(fetch, normalize, tokenize, scan, branch, forecast, total).",
    ["stage"],
    buckets=SECONDS,
)
BATCH_SIZE = Histogram(
    "ehrmamba_batch_size",
    "Patients scored together in one engine call.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
QUEUE_WAIT = Histogram(
    "ehrmamba_queue_wait_seconds",
    "Time a request waited for the engine before its batch ran.",
    buckets=SECONDS,
)
QUEUE_DEPTH = Gauge(
    "ehrmamba_queue_depth",
    "Requests waiting for the engine, summed over live workers.",
    multiprocess_mode="livesum",
)
QUEUE_REJECTIONS = Counter(
    "ehrmamba_queue_rejections_total",
    "Requests refused at once: the engine queue was full (full) or the worker had its "
    "limit of requests in progress (in_flight).",
    ["reason"],
)

CACHE_REQUESTS = Counter(
    "ehrmamba_cache_requests_total",
    "Cache lookups by entry kind (timeline, state, explanation) and result (hit, miss, extended).",
    ["kind", "result"],
)
# livemax, not max: a worker that died while Redis was down must not flag the service
# degraded forever once mark_worker_dead has removed its values.
CACHE_DEGRADED = Gauge(
    "ehrmamba_cache_degraded",
    "1 while Redis is configured but not answering (the in-process cache stands in).",
    multiprocess_mode="livemax",
)
CACHE_ERRORS = Counter("ehrmamba_cache_errors_total", "Cache operations that failed.")

FHIR_DURATION = Histogram(
    "ehrmamba_fhir_request_duration_seconds",
    "Time of one request to a FHIR server, by resource type and HTTP method.",
    ["resource_type", "method"],
    buckets=SECONDS,
)
FHIR_ERRORS = Counter(
    "ehrmamba_fhir_errors_total",
    "Failed FHIR requests by resource type and kind "
    "(timeout, status_4xx, status_5xx, connection, malformed).",
    ["resource_type", "kind"],
)

CDS_REQUESTS = Counter(
    "ehrmamba_cds_requests_total",
    "CDS Hooks service calls by service id and HTTP status.",
    ["service", "status"],
)
CDS_FEEDBACK = Counter(
    "ehrmamba_cds_feedback_total",
    "CDS Hooks feedback received, by service id and card outcome.",
    ["service", "outcome"],
)
JWT_REJECTIONS = Counter(
    "ehrmamba_jwt_rejections_total",
    "CDS client JWTs refused, by reason.",
    ["reason"],
)

PREDICTIONS = Counter(
    "ehrmamba_predictions_total",
    "Task predictions answered, by task and risk level.",
    ["task", "risk"],
)
PREDICTION_SCORE = Histogram(
    "ehrmamba_prediction_score",
    "Predicted probabilities per task, to watch their distribution drift.",
    ["task"],
    buckets=tuple(round(0.05 * step, 2) for step in range(1, 21)),
)
# A gauge set to 1 rather than an Info metric, which multiprocess mode cannot collect;
# livemax keeps one series per model identity among the workers still running.
MODEL_INFO = Gauge(
    "ehrmamba_model_info",
    "The served model: always 1, its identity in the labels.",
    ["name", "version", "sha256"],
    multiprocess_mode="livemax",
)
STORE_ERRORS = Counter(
    "ehrmamba_store_errors_total",
    "Prediction, feedback or audit store operations that failed, by operation.",
    ["operation"],
)


def _multiprocess() -> bool:
    """Whether prometheus_client chose memory-mapped values when it was imported. Asking it,
    rather than reading PROMETHEUS_MULTIPROC_DIR again, keeps collection consistent with how
    the values were actually stored."""
    return values.ValueClass is not values.MutexValue


def metrics_payload() -> tuple[bytes, str]:
    """The exposition text and its content type: all workers' values in multiprocess mode
    (a fresh registry, as prometheus_client requires), this process's otherwise."""
    registry = REGISTRY
    if _multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop an exited worker's live gauges (queue depth, cache degraded, model info) so they
    stop counting; its counters and histograms stay, as Prometheus expects of counters."""
    if _multiprocess():
        mark_process_dead(pid)  # type: ignore[no-untyped-call]  # unannotated upstream


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_template(scope: Scope) -> str:
    # Starlette's router leaves the route it picked in the scope; its path_format is the
    # template ("/patients/{patient_id}/predict"), never the path the client sent.
    template = getattr(scope.get("route"), "path_format", None)
    return template if isinstance(template, str) else "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request, ``/metrics`` scrapes included (filter them with
    ``route!="/metrics"``), labelled by the route template found once routing is done.

    Pure ASGI rather than BaseHTTPMiddleware so that streamed bodies pass through unbuffered;
    the time runs until the app returns, so it covers a streamed response to its end.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers for an app that raises or answers nothing

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = 500  # also when the failure cut short a body whose header said 200
            raise
        finally:
            route = _route_template(scope)
            # Any token is a valid method; an unknown one must not mint new series.
            method = scope["method"] if scope["method"] in _METHODS else "other"
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_DURATION.labels(route, method).observe(time.perf_counter() - started)


def observe_fhir(method: str, resource_type: str, seconds: float, outcome: str) -> None:
    """The FHIR client's request observer (``FhirClientConfig.observer``)."""
    FHIR_DURATION.labels(resource_type, method).observe(seconds)
    if outcome != "ok":
        FHIR_ERRORS.labels(resource_type, outcome).inc()
