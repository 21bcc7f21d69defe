"""The FastAPI application, built from one ``Settings`` object.

The model is loaded in a worker thread at start-up; until it is, readiness says why and
model routes answer 503. A corrupt or mismatched artifact keeps the service not-ready with
the artifact's own error message, rather than crashing the process in a restart loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from model.artifact import ArtifactError, load_artifact
from service.outcomes import ServiceError, service_error_handler, validation_error_handler
from service.routes import health, predict
from service.scoring import Scorer
from service.settings import Settings
from service.state import ServiceState


def create_app(settings: Settings | None = None) -> FastAPI:
    state = ServiceState(settings or Settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            artifact = await anyio.to_thread.run_sync(load_artifact, state.settings.model_path)
        except (ArtifactError, OSError) as exc:
            state.not_ready = f"model artifact unusable: {exc}"
        else:
            state.scorer = Scorer(artifact)
            state.not_ready = None
            state.checks["model"] = f"{artifact.config.name} {artifact.version}"
        yield

    app = FastAPI(
        title="EHRMamba over FHIR",
        summary="Six clinical risks and next-event forecasts from one recurrent pass.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(health.router)
    app.include_router(predict.router)
    return app
