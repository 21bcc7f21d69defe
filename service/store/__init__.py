"""The prediction, CDS feedback and audit store (DESIGN.md section 6): SQLAlchemy 2 over
SQLite or PostgreSQL, its schema kept by Alembic migrations that run when it opens."""

from service.store.database import StoreUnavailable, create_store_engine, downgrade, upgrade
from service.store.store import (
    AuditEvent,
    AuditRow,
    FeedbackItem,
    FeedbackResult,
    NewPrediction,
    PredictionRow,
    Store,
)

__all__ = [
    "AuditEvent",
    "AuditRow",
    "FeedbackItem",
    "FeedbackResult",
    "NewPrediction",
    "PredictionRow",
    "Store",
    "StoreUnavailable",
    "create_store_engine",
    "downgrade",
    "upgrade",
]
