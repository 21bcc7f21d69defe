"""Admission: how many requests one worker works on at once, refused beyond it.

The engine queue (``batching``) is bounded, but a request reaches it only after its FHIR
reads, so under overload requests pile up in front of it, each holding a connection and
memory, until callers time out (measured: docs/benchmarks.md, "Soak"). Counting requests
from the moment they are accepted refuses the excess at once with 429 and ``Retry-After``,
which a caller can act on, while the admitted ones still finish in reasonable time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service import metrics
from service.outcomes import ServiceError


class Admission:
    """At most ``limit`` requests in progress; the event loop is single-threaded, so a
    plain counter is exact."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one place for the block; 429 at once when every place is taken."""
        if self.active >= self.limit:
            metrics.QUEUE_REJECTIONS.labels("in_flight").inc()
            raise ServiceError(429, "throttled", f"busy: {self.limit} requests in progress; "
                               "retry shortly", headers={"Retry-After": "1"})  # fmt: skip
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
