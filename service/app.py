"""The FastAPI application, built from one ``Settings`` object.

At start-up the model is loaded and the store migrated in worker threads; until both are
done, readiness says why and model routes answer 503. A corrupt or mismatched artifact or
an unreachable database keeps the service not-ready with the reason, rather than crashing
the process into a restart loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import numba
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from fhir_adapter.client import FhirClient
from model.artifact import ArtifactError, load_artifact
from model.onnx_step import OnnxStep
from service import metrics
from service.admission import Admission
from service.batching import MicroBatcher
from service.cache import MemoryCache, RedisCache, ResilientCache
from service.cds.jwt import ClientTokenVerifier
from service.limits import BodySizeLimit
from service.metrics import MetricsMiddleware
from service.outcomes import (
    ServiceError,
    http_error_handler,
    service_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from service.patient_cache import PatientCache
from service.routes import cds, health, predict, view
from service.routes import metrics as metrics_route
from service.scoring import Scorer
from service.settings import Settings
from service.state import ServiceState
from service.store import Store, StoreUnavailable

STORE_RETRY_S = 5.0


def create_app(settings: Settings | None = None) -> FastAPI:
    # httpx logs every request URL at INFO, and FHIR URLs carry patient ids.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    state = _state(settings or Settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await _start(state)
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="EHRMamba over FHIR",
        summary="Six clinical risks and next-event forecasts from one recurrent pass.",
        description="Predictions over FHIR, CDS Hooks 2.0 services, and operations "
        "endpoints. Errors are FHIR OperationOutcome resources.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    app.include_router(predict.router)
    app.include_router(view.router)
    app.include_router(cds.router)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    return app


def _state(settings: Settings) -> ServiceState:
    remote = RedisCache(settings.redis_url) if settings.redis_url else None
    cache = ResilientCache(remote, MemoryCache(settings.cache_max_entries))
    secret = settings.cache_key_secret
    key = secret.get_secret_value().encode() if secret else secrets.token_bytes(32)
    return ServiceState(
        settings=settings,
        cache=cache,
        patients=PatientCache(cache, key, settings.cache_ttl, settings.record_memo),
        verifier=ClientTokenVerifier(settings.cds_issuers, cache, settings.cds_jwt_leeway),
        admission=Admission(settings.max_in_flight),
    )


async def _start(state: ServiceState) -> None:
    settings = state.settings
    if settings.fhir_base_url:  # one client, one connection pool, for the process's life
        state.fhir = FhirClient(state.fhir_config())
    state.threads_before = (torch.get_num_threads(), numba.get_num_threads())
    _set_threads(settings.engine_threads, settings.engine_threads)
    try:
        artifact = await anyio.to_thread.run_sync(load_artifact, settings.model_path)
    except (ArtifactError, OSError) as exc:
        state.problems["model"] = f"model artifact unusable: {exc}"
    else:
        step = None
        if settings.engine_step == "onnxruntime" and artifact.onnx_step is not None:
            step = OnnxStep(artifact.onnx_step, settings.engine_threads)
        scorer = Scorer(artifact, step)
        state.scorer = scorer
        state.batcher = MicroBatcher(
            scorer.run,
            max_size=settings.batch_max_size,
            max_wait=settings.batch_max_wait,
            queue_max=settings.queue_max,
            in_progress=lambda: state.admission.active,
        )
        state.batcher.start()
        state.checks["model"] = f"{artifact.config.name} {artifact.version}"
        metrics.MODEL_INFO.labels(artifact.config.name, artifact.version, artifact.sha256).set(1)
    if not await _open_store(state):
        # The database may come up after us (a restarted PostgreSQL, a compose start order
        # gone wrong): keep trying rather than stay not-ready until someone restarts us.
        state.store_opener = asyncio.get_running_loop().create_task(_keep_opening_store(state))
    state.checks["cache"] = await state.cache.check()
    del state.problems["start"]


async def _open_store(state: ServiceState) -> bool:
    try:
        state.store = await anyio.to_thread.run_sync(Store.open, state.settings.database_url)
    except StoreUnavailable as exc:
        state.problems["store"] = f"store unavailable: {exc}"
        return False
    state.problems.pop("store", None)
    state.checks["store"] = state.store.dialect
    return True


async def _keep_opening_store(state: ServiceState) -> None:
    while True:
        await asyncio.sleep(STORE_RETRY_S)
        if await _open_store(state):
            return


def _set_threads(torch_threads: int, numba_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # untyped module
    numba.set_num_threads(min(numba_threads, most))


async def _stop(state: ServiceState) -> None:
    if state.threads_before is not None:  # the process may live on (tests, embedding)
        _set_threads(*state.threads_before)
    if state.store_opener is not None:
        state.store_opener.cancel()
    for task in state.background:
        task.cancel()
    await asyncio.gather(*state.background, return_exceptions=True)
    if state.batcher is not None:
        await state.batcher.stop()
    await state.cache.aclose()
    if state.fhir is not None:
        await state.fhir.aclose()
        state.fhir = None
    if state.store is not None:
        state.store.close()
    metrics.mark_worker_dead(os.getpid())
