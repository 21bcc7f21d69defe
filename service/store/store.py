"""The service's record of what it did: the predictions it answered, the CDS feedback on
its cards, and an audit trail of who asked for what.

Patient ids are stored (this is a clinical store, and a patient's history is read back by
id) but never logged nor put in an error message. The methods are async and run
SQLAlchemy's blocking calls in a worker thread, so a slow database never stalls the event
loop. Every database failure surfaces as ``StoreUnavailable``, so the service answers 503
rather than losing a write quietly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, TypeVarTuple

import anyio
from sqlalchemy import Engine, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import sessionmaker

from service.store.database import create_store_engine, reported, upgrade
from service.store.schema import FEEDBACK_IDENTITY, AuditRecord, FeedbackRecord, PredictionRecord

T = TypeVar("T")
Args = TypeVarTuple("Args")

# INSERT ... ON CONFLICT DO NOTHING RETURNING: both backends have it, each in its own construct.
_INSERT: dict[str, Callable[[type[FeedbackRecord]], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class NewPrediction:
    """One prediction the service answered: for whom, from which FHIR server, asked by
    whom (``source``: "api" or "cds:<service-id>"), by which model, and the answer."""

    patient_id: str
    fhir_base: str
    source: str
    model_name: str
    model_version: str
    model_sha256: str
    tasks: Sequence[str]  # read back as a tuple
    results: dict[str, Any]  # per task probability and risk, not_scored reasons, forecast
    data: dict[str, Any]  # facts about the data scored (column data_facts)
    timings: dict[str, float]
    created_at: datetime = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class PredictionRow(NewPrediction):
    """A stored prediction and its id."""

    id: int


@dataclass(frozen=True)
class FeedbackItem:
    """One CDS Hooks feedback item: what the clinician did with one card."""

    card: str  # the card's uuid
    outcome: str  # "accepted" or "overridden"
    outcome_timestamp: datetime
    accepted_suggestions: list[dict[str, Any]] = field(default_factory=list)
    override_reason: dict[str, Any] | None = None  # {"reason": Coding, "userComment": ...}


@dataclass(frozen=True)
class FeedbackResult:
    """How many items of one feedback call were new, and how many were already stored."""

    stored: int
    duplicates: int


@dataclass(frozen=True)
class AuditEvent:
    """One request for the audit trail: who (an API key label, a CDS issuer or
    "anonymous") did what, about which patient, and how it ended (HTTP status and a short
    outcome)."""

    actor: str
    action: str
    status: int
    outcome: str
    patient_id: str | None = None
    fhir_base: str | None = None
    model_version: str | None = None
    at: datetime = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class AuditRow(AuditEvent):
    """A stored audit event and its id."""

    id: int


class Store:
    """Predictions, CDS feedback and the audit trail in one SQL database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> Store:
        """The store at ``url``, its schema upgraded to the newest first (blocking)."""
        upgrade(url)
        return cls(create_store_engine(url))

    @property
    def dialect(self) -> str:
        """The database's kind: "sqlite" or "postgresql"."""
        return self.engine.dialect.name

    async def record_prediction(
        self, prediction: NewPrediction, audit: AuditEvent | None = None
    ) -> int:
        """Store one prediction, and with it (same transaction) ``audit``; its id."""
        return await self._call(self._record_prediction, prediction, audit)

    async def predictions(
        self, fhir_base: str | None, patient_id: str, limit: int = 50
    ) -> list[PredictionRow]:
        """A patient's predictions, newest first; from one FHIR server, or any if None."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._call(self._predictions, fhir_base, patient_id, limit)

    async def record_feedback(
        self, service_id: str, items: Sequence[FeedbackItem]
    ) -> FeedbackResult:
        """Store a CDS service's feedback items; an item stored before (same service, card,
        outcome and outcome timestamp) is counted as a duplicate and not stored again."""
        return await self._call(self._record_feedback, service_id, items)

    async def audit(self, event: AuditEvent) -> None:
        """Add one event to the audit trail."""
        await self._call(self._audit, event)

    async def audit_events(self, limit: int = 100) -> list[AuditRow]:
        """The newest audit events, newest first."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._call(self._audit_events, limit)

    async def check(self) -> None:
        """Raise ``StoreUnavailable`` unless the database answers."""
        await self._call(self._check)

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    async def _call(self, work: Callable[[*Args], T], *args: *Args) -> T:
        with reported(self.engine.url):
            return await anyio.to_thread.run_sync(work, *args)

    def _record_prediction(self, prediction: NewPrediction, audit: AuditEvent | None) -> int:
        record = PredictionRecord(
            created_at=prediction.created_at,
            patient_id=prediction.patient_id,
            fhir_base=prediction.fhir_base,
            source=prediction.source,
            model_name=prediction.model_name,
            model_version=prediction.model_version,
            model_sha256=prediction.model_sha256,
            tasks=list(prediction.tasks),
            results=prediction.results,
            data_facts=prediction.data,
            timings=prediction.timings,
        )
        with self._sessions.begin() as session:
            session.add(record)
            if audit is not None:
                session.add(_audit_record(audit))
            session.flush()
            return record.id

    def _predictions(
        self, fhir_base: str | None, patient_id: str, limit: int
    ) -> list[PredictionRow]:
        query = select(PredictionRecord).where(PredictionRecord.patient_id == patient_id)
        if fhir_base is not None:
            query = query.where(PredictionRecord.fhir_base == fhir_base)
        query = query.order_by(PredictionRecord.created_at.desc(), PredictionRecord.id.desc())
        with self._sessions.begin() as session:
            records = session.scalars(query.limit(limit)).all()
        return [
            PredictionRow(
                id=r.id,
                created_at=r.created_at,
                patient_id=r.patient_id,
                fhir_base=r.fhir_base,
                source=r.source,
                model_name=r.model_name,
                model_version=r.model_version,
                model_sha256=r.model_sha256,
                tasks=tuple(r.tasks),
                results=r.results,
                data=r.data_facts,
                timings=r.timings,
            )
            for r in records
        ]

    def _record_feedback(self, service_id: str, items: Sequence[FeedbackItem]) -> FeedbackResult:
        insert = _INSERT[self.dialect]
        received_at = _now()
        stored = 0
        with self.engine.begin() as connection:
            for item in items:
                statement = (
                    insert(FeedbackRecord)
                    .values(
                        received_at=received_at,
                        service_id=service_id,
                        card_uuid=item.card,
                        outcome=item.outcome,
                        outcome_timestamp=item.outcome_timestamp,
                        accepted_suggestions=item.accepted_suggestions,
                        override_reason=item.override_reason,
                    )
                    .on_conflict_do_nothing(index_elements=FEEDBACK_IDENTITY)
                    .returning(FeedbackRecord.id)
                )
                if connection.execute(statement).first() is not None:
                    stored += 1
        return FeedbackResult(stored=stored, duplicates=len(items) - stored)

    def _audit(self, event: AuditEvent) -> None:
        with self._sessions.begin() as session:
            session.add(_audit_record(event))

    def _audit_events(self, limit: int) -> list[AuditRow]:
        query = select(AuditRecord).order_by(AuditRecord.at.desc(), AuditRecord.id.desc())
        with self._sessions.begin() as session:
            records = session.scalars(query.limit(limit)).all()
        return [
            AuditRow(
                id=r.id,
                at=r.at,
                actor=r.actor,
                action=r.action,
                status=r.status,
                outcome=r.outcome,
                patient_id=r.patient_id,
                fhir_base=r.fhir_base,
                model_version=r.model_version,
            )
            for r in records
        ]

    def _check(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))


def _audit_record(event: AuditEvent) -> AuditRecord:
    return AuditRecord(
        at=event.at,
        actor=event.actor,
        action=event.action,
        patient_id=event.patient_id,
        fhir_base=event.fhir_base,
        model_version=event.model_version,
        status=event.status,
        outcome=event.outcome,
    )
