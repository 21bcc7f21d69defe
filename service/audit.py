"""The audit trail: who asked about which patient, with which model, when, and what came
of it. Every call to a patient route writes one event, whether it succeeded or failed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from service import metrics
from service.outcomes import ServiceError
from service.scoring import Scorer
from service.state import ServiceState
from service.store import AuditEvent, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass
class AuditContext:
    """Filled in by the route as it learns more (the FHIR server it read from)."""

    fhir_base: str | None = None


@asynccontextmanager
async def audited(
    state: ServiceState,
    actor: str,
    action: str,
    patient_id: str | None,
    scorer: Scorer | None,
) -> AsyncIterator[AuditContext]:
    """Run the body, then record its outcome. A failed audit write turns a success into a
    503 (an unaudited answer is not given); after a failure it is counted and logged, and the
    original error stands."""
    context = AuditContext(fhir_base=state.settings.fhir_base_url)
    status, outcome = 200, "ok"
    try:
        yield context
    except ServiceError as exc:
        status, outcome = exc.status, exc.code
        raise
    except Exception:
        status, outcome = 500, "exception"
        raise
    finally:
        written = await _write(state, AuditEvent(
            actor=actor, action=action, patient_id=patient_id, fhir_base=context.fhir_base,
            model_version=scorer.artifact.version if scorer else None,
            status=status, outcome=outcome,
        ))  # fmt: skip
        if not written and status < 400:
            raise ServiceError(503, "transient", "the audit trail could not be written",
                               headers={"Retry-After": "5"})  # fmt: skip


async def _write(state: ServiceState, event: AuditEvent) -> bool:
    if state.store is None:
        return False
    try:
        await state.store.audit(event)
    except StoreUnavailable:
        metrics.STORE_ERRORS.labels("audit").inc()
        log.warning("audit event for action %s could not be written", event.action)
        return False
    return True
