"""The audit trail: who asked about which patient, with which model, when, and what came
of it. Every call to a patient route writes one event, whether it succeeded or failed.

A call that records a prediction (``predicting.record_prediction``) writes its success
event in the prediction's own transaction: one commit instead of two, and never a
prediction without its event or the reverse. Should the call still fail after that, its
failure is written as a second event, so the last event of a call says how it ended."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from service import metrics
from service.outcomes import ServiceError
from service.scoring import Scorer
from service.state import ServiceState
from service.store import AuditEvent, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass
class AuditContext:
    """One call's audit event in the making; the route fills in what it learns (the FHIR
    server it read from)."""

    actor: str
    action: str
    patient_id: str | None
    model_version: str | None
    fhir_base: str | None = None
    written: bool = False  # the success event went into the prediction's transaction

    def event(self, status: int = 200, outcome: str = "ok") -> AuditEvent:
        return AuditEvent(
            actor=self.actor, action=self.action, patient_id=self.patient_id,
            fhir_base=self.fhir_base, model_version=self.model_version,
            status=status, outcome=outcome,
        )  # fmt: skip


# The call being audited in this task, for record_prediction to write its event with.
_CURRENT: ContextVar[AuditContext | None] = ContextVar("ehrmamba_audit", default=None)


def current_audit() -> AuditContext | None:
    """The audit context of the call running in this task, if any."""
    return _CURRENT.get()


@asynccontextmanager
async def audited(
    state: ServiceState,
    actor: str,
    action: str,
    patient_id: str | None,
    scorer: Scorer | None,
) -> AsyncIterator[AuditContext]:
    """Run the body, then record its outcome (unless a success event was already written
    with the prediction). A failed audit write turns a success into a 503 (an unaudited
    answer is not given); after a failure it is counted and logged, and the original error
    stands."""
    context = AuditContext(
        actor, action, patient_id, scorer.artifact.version if scorer else None,
        fhir_base=state.settings.fhir_base_url,
    )  # fmt: skip
    token = _CURRENT.set(context)
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
        _CURRENT.reset(token)
        if not (context.written and status < 400):
            written = await _write(state, context.event(status, outcome))
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
