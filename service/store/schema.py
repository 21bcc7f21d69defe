"""The store's tables as typed SQLAlchemy classes.

The Alembic revisions in ``migrations/versions`` create the same schema (a test compares
the two), so a change here needs a new revision. Timestamps go through ``UtcDateTime``
because SQLite keeps no offset: without it, a time written as aware would read back naive.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Dialect, Index, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# What makes two CDS feedback items the same item (CDS Hooks 2.0 feedback).
FEEDBACK_IDENTITY = ("service_id", "card_uuid", "outcome", "outcome_timestamp")


class UtcDateTime(TypeDecorator[datetime]):
    """An aware datetime, stored as UTC and read back as aware UTC on every backend.

    Naive values are refused: the store cannot know which clock they were read from.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError("the store keeps timezone-aware datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime}


class PredictionRecord(Base):
    """One prediction the service answered."""

    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_patient_id_created_at", "patient_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime]
    patient_id: Mapped[str]
    fhir_base: Mapped[str]
    source: Mapped[str]
    model_name: Mapped[str]
    model_version: Mapped[str]
    model_sha256: Mapped[str]
    tasks: Mapped[list[str]] = mapped_column(JSON)
    results: Mapped[dict[str, Any]] = mapped_column(JSON)
    data_facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    timings: Mapped[dict[str, float]] = mapped_column(JSON)


class FeedbackRecord(Base):
    """One CDS Hooks feedback item on one of our cards."""

    __tablename__ = "cds_feedback"
    __table_args__ = (UniqueConstraint(*FEEDBACK_IDENTITY, name="uq_cds_feedback_item"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime]
    service_id: Mapped[str]
    card_uuid: Mapped[str]
    outcome: Mapped[str]
    outcome_timestamp: Mapped[datetime]
    accepted_suggestions: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    override_reason: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class AuditRecord(Base):
    """One request in the audit trail."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_at", "at"),
        Index("ix_audit_events_patient_id_at", "patient_id", "at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str]
    action: Mapped[str]
    patient_id: Mapped[str | None]
    fhir_base: Mapped[str | None]
    model_version: Mapped[str | None]
    status: Mapped[int]
    outcome: Mapped[str]
