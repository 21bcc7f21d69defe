"""The service's ``make_api`` fixture, shared with the service tests (an app built from
``Settings`` overrides, lifespan included)."""

from tests.service.conftest import make_api

__all__ = ["make_api"]
