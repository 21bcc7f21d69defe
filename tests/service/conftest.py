"""The service app against the real FHIR server process, with the committed model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.conftest import LoadedServer

MODEL = Path(__file__).parents[2] / "models" / "compact"

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def make_api() -> ApiFactory:
    """An HTTP client for an app built from ``Settings(**overrides)``, lifespan included."""

    @asynccontextmanager
    async def make(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(Settings(**{"model_path": MODEL, **overrides}))  # type: ignore[arg-type]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as c:
                yield c

    return make


@pytest.fixture
async def api(make_api: ApiFactory, loaded_fhir: LoadedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api(fhir_base_url=loaded_fhir.base_url) as client:
        yield client
