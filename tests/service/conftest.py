"""The service app against the real FHIR server process, with the committed model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.conftest import LoadedServer
from tests.support.databases import postgres_database, postgres_schema

MODEL = Path(__file__).parents[2] / "models" / "compact"

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """A database of its own for this test session on the machine's PostgreSQL server."""
    with postgres_database() as name:
        yield name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store database: a SQLite file whose folder does not exist yet, or a fresh
    schema in the session's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'store.db'}"
    else:
        with postgres_schema(request.getfixturevalue("postgres_db")) as url:
            yield url


@pytest.fixture
def make_api(tmp_path: Path) -> ApiFactory:
    """An HTTP client for an app built from ``Settings(**overrides)``, lifespan included."""

    @asynccontextmanager
    async def make(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
        # Four integration steps: explanations (CDS cards ask for them) stay cheap where
        # their accuracy is not what a test is about; tests/model/test_explain.py checks it.
        defaults = {"model_path": MODEL, "database_url": f"sqlite:///{tmp_path / 'store.db'}",
                    "explain_steps": 4}  # fmt: skip
        app = create_app(Settings(**{**defaults, **overrides}))  # type: ignore[arg-type]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as c:
                yield c

    return make


@pytest.fixture
async def api(make_api: ApiFactory, loaded_fhir: LoadedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api(fhir_base_url=loaded_fhir.base_url) as client:
        yield client
