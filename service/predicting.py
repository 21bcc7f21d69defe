"""The one path from a patient's record to a recorded answer, shared by the REST route and
the CDS Hooks services.

1. **Record**: from the cache and an incremental FHIR fetch (``_lastUpdated`` beyond the
   cached watermark, one batch request where the server takes it), or a full fetch, or a
   CDS request's prefetch; or, within ``EHRMAMBA_FHIR_FRESHNESS`` seconds of the last time
   the FHIR server confirmed it, the cached record alone (``fresh-cache``; off by default).
2. **Tokens**: the one normaliser and the artifact's tokenizer.
3. **Scan state**: the cached state is used when the new tokens extend the cached ones
   exactly; otherwise the engine scans from the start (same answer either way).
4. **Score** through the micro-batcher, **cache** the new state, **record** the prediction
   (with the call's audit event, in one transaction).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import FhirError, FhirNotFound, FhirTimeout, FhirUnavailable
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from model.tasks import Task
from service import metrics
from service.audit import current_audit
from service.batching import QueueFull
from service.outcomes import ServiceError
from service.patient_cache import CachedRecord, StoredScan, merge_records, sequence_digest
from service.scoring import Scored, Scorer
from service.state import ServiceState
from service.store import NewPrediction, StoreUnavailable


@dataclass(frozen=True)
class Fetched:
    record: PatientRecord
    mode: str  # cold, incremental, fresh-cache or prefetch
    seconds: float
    checked_at: float | None = None  # when the FHIR server last confirmed it (epoch s)
    # The cache entry when ``record`` is exactly the cached record (nothing new came): its
    # timeline is in the process's memo and the entry need not be written again.
    unchanged: CachedRecord | None = None


async def fetch_record(state: ServiceState, fhir: FhirClient, patient_id: str) -> Fetched:
    """The patient's current record: the cached one brought up to date when there is one,
    else a full read; the cached one as it is while the FHIR server confirmed it less than
    ``fhir_freshness`` seconds ago. FHIR failures become 404/502/504 ServiceErrors. With
    freshness 0 no confirmation is ever used, so none is read or written."""
    started = time.perf_counter()
    freshness = state.settings.fhir_freshness
    cached = await state.patients.load_record(fhir.base_url, patient_id, checked=freshness > 0)
    if cached is not None and _fresh(cached.checked_at, freshness):
        return Fetched(cached.record, "fresh-cache", time.perf_counter() - started,
                       cached.checked_at, unchanged=cached)  # fmt: skip
    # Taken before the request: what changes after it may not be in the answer.
    asked = wall_clock() if freshness > 0 else None
    try:
        if cached is not None and cached.watermark is not None:
            delta = await fhir.fetch_patient(patient_id, since=cached.watermark)
            if _adds_nothing(delta, cached.record):
                return Fetched(cached.record, "incremental", time.perf_counter() - started,
                               asked, unchanged=cached)  # fmt: skip
            record, mode = merge_records(cached.record, delta), "incremental"
        else:
            record, mode = await fhir.fetch_patient(patient_id), "cold"
    except FhirError as exc:
        raise fhir_failure(exc) from exc
    return Fetched(record, mode, time.perf_counter() - started, asked)


def _adds_nothing(delta: PatientRecord, cached: PatientRecord) -> bool:
    """Whether merging ``delta`` into ``cached`` would give ``cached`` back."""
    return (
        not delta.resources
        and not delta.medications
        and not delta.dropped
        and delta.patient == cached.patient
    )


def _fresh(checked_at: float | None, freshness: float) -> bool:
    """Whether a record the FHIR server confirmed at ``checked_at`` may be used without
    asking it again (never with freshness 0, nor for a time ahead of this clock)."""
    return checked_at is not None and 0.0 <= wall_clock() - checked_at < freshness


def wall_clock() -> float:
    """Seconds since the epoch: what replicas sharing a cache agree on."""
    return time.time()


def fhir_failure(exc: FhirError) -> ServiceError:
    """The answer for a failed FHIR read: 404 unknown patient, 504 timeout, else 502 with
    what went wrong, safe to show (the HTTP status, or the FHIR client's own words for an
    answer that is not FHIR; never the server's text, which may hold anything)."""
    if isinstance(exc, FhirNotFound):
        return ServiceError(404, "not-found", "patient not found on the FHIR server")
    if isinstance(exc, FhirTimeout):
        return ServiceError(504, "timeout", "the FHIR server did not answer in time")
    if isinstance(exc, FhirUnavailable):
        reason = "unreachable"
    elif exc.status is not None and exc.status >= 300:
        reason = f"HTTP {exc.status}"
    else:
        reason = exc.message
    return ServiceError(502, "exception", f"the FHIR server failed: {reason}")


async def score_record(
    state: ServiceState,
    scorer: Scorer,
    fetched: Fetched,
    tasks: Sequence[Task],
    forecast: int,
) -> tuple[Scored, dict[str, Any]]:
    """Score ``fetched.record`` (continuing a cached scan where the tokens allow), cache
    what the next call needs, and return the result with its facts and timings."""
    record = fetched.record
    started = time.perf_counter()
    if fetched.unchanged is not None:
        timeline = state.patients.memo.timeline(fetched.unchanged)
    else:
        timeline = build_timeline(record)
    if timeline.patient.birth_date is None:  # the tokenizer's age stream cannot start
        raise ServiceError(422, "processing", "cannot score this patient: no usable birthDate")
    now = datetime.now(UTC)
    sequence = await anyio.to_thread.run_sync(scorer.tokenize, timeline, now)
    tokenized = time.perf_counter()
    sha = scorer.artifact.sha256
    stored = await state.patients.load_scan(record.source, record.patient_id, sha)
    cached = stored.scan if stored is not None and stored.covers(sequence) else None
    try:
        prepared = scorer.prepare(timeline, sequence, tasks, forecast, now, cached)
    except ValueError as exc:
        raise ServiceError(422, "processing", f"cannot score this patient: {exc}") from exc
    batcher = state.batcher
    assert batcher is not None
    try:
        scored = await batcher.submit(prepared)
    except QueueFull as exc:
        raise ServiceError(429, "throttled", f"busy: {exc}; retry shortly",
                           headers={"Retry-After": "1"}) from exc  # fmt: skip
    finished = time.perf_counter()
    state_use = "miss" if cached is None else ("hit" if scored.scanned_tokens == 0 else "extended")
    metrics.CACHE_REQUESTS.labels("state", state_use).inc()
    await state.patients.save_scan(
        record.source, record.patient_id, sha,
        StoredScan(scored.cache, sequence_digest(sequence, scored.cache.length)),
    )  # fmt: skip
    if fetched.mode not in ("prefetch", "fresh-cache"):  # a fresh-cache record is unchanged
        if fetched.unchanged is None:
            await state.patients.save_record(
                CachedRecord(record, timeline.source.last_updated, fetched.checked_at), timeline
            )
        elif fetched.checked_at is not None:
            await state.patients.save_checked(record.source, record.patient_id,
                                              fetched.checked_at)  # fmt: skip
    timings = {
        "fetch_s": fetched.seconds,
        "tokenize_s": tokenized - started,  # normalise and tokenize
        "queue_s": max(0.0, finished - tokenized - scored.timings["score_s"]),
        "score_s": scored.timings["score_s"],  # the engine call, for the whole batch
    }
    for stage, seconds in (("fetch", fetched.seconds), ("tokenize", tokenized - started),
                           ("score", scored.timings["score_s"])):  # fmt: skip
        metrics.INFERENCE_STAGE.labels(stage).observe(seconds)
    context = {"record": fetched.mode, "state": state_use, "scanned_tokens": scored.scanned_tokens}
    return scored, {"timings": timings, "cache": context}


async def record_prediction(
    state: ServiceState,
    scorer: Scorer,
    record: PatientRecord,
    source: str,
    tasks: Sequence[Task],
    answer: dict[str, Any],
) -> int:
    """Write the prediction to the store, with the success event of the call being audited
    (``service.audit``) in the same transaction; 503 when it cannot be written (a
    prediction that is not recorded is not answered: the audit trail must be complete)."""
    store = state.store
    assert store is not None
    artifact = scorer.artifact
    audit = current_audit()
    if audit is not None and audit.written:  # one event per call, written with the first
        audit = None
    try:
        prediction_id = await store.record_prediction(
            NewPrediction(
                patient_id=record.patient_id,
                fhir_base=record.source,
                source=source,
                model_name=artifact.config.name,
                model_version=artifact.version,
                model_sha256=artifact.sha256,
                tasks=[t.value for t in tasks],
                results={k: answer[k] for k in ("predictions", "not_scored", "forecast")},
                data=answer["data"],
                timings=answer["timings"],
            ),
            audit.event() if audit is not None else None,
        )
    except StoreUnavailable as exc:
        metrics.STORE_ERRORS.labels("record_prediction").inc()
        raise ServiceError(
            503, "transient", "the prediction could not be recorded; nothing was answered",
            headers={"Retry-After": "5"},
        ) from exc  # fmt: skip
    if audit is not None:
        audit.written = True
    return prediction_id


def observe_scores(scorer: Scorer, scored: Scored) -> None:
    thresholds = scorer.artifact.config.thresholds
    for task, p in scored.probabilities.items():
        metrics.PREDICTIONS.labels(task.value, thresholds[task].level(p)).inc()
        metrics.PREDICTION_SCORE.labels(task.value).observe(p)
