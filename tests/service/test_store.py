"""The prediction, feedback and audit store, each test on a SQLite file and on the real
PostgreSQL server: migrations from an empty database, round trips, history, feedback
idempotency, several workers at once, and failures surfacing as ``StoreUnavailable``
without credentials or patient ids."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select
from sqlalchemy.exc import StatementError

from service.store import (
    AuditEvent,
    AuditRow,
    FeedbackItem,
    FeedbackResult,
    NewPrediction,
    PredictionRow,
    Store,
    StoreUnavailable,
    create_store_engine,
    downgrade,
    upgrade,
)
from service.store.database import alembic_config
from service.store.schema import Base, FeedbackRecord
from tests.support.databases import closed_port, postgres_url

TABLES = {"predictions", "cds_feedback", "audit_events"}
FHIR_A = "https://fhir-a.hospital.example/r4"
FHIR_B = "https://fhir-b.hospital.example/r4"
PASSWORD = "s3cret-Pa55word"
PATIENT = "patient-7f3a"
T0 = datetime(2025, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def url(database_url: str) -> str:
    return database_url


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    opened = Store.open(url)
    yield opened
    opened.close()


@pytest.fixture(params=BACKENDS)
def unreachable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file under a regular file; a PostgreSQL URL, with a password, on a closed
    loopback port."""
    if request.param == "sqlite":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        return f"sqlite:///{blocker / 'store.db'}"
    return postgres_url("test", password=PASSWORD, port=closed_port())


def _prediction(
    patient_id: str = PATIENT, fhir_base: str = FHIR_A, at: datetime = T0
) -> NewPrediction:
    return NewPrediction(
        patient_id=patient_id,
        fhir_base=fhir_base,
        source="cds:ehrmamba-risk",
        model_name="ehrmamba-compact",
        model_version="2025.03.1",
        model_sha256="ab" * 32,
        tasks=("mortality", "readmission", "length_of_stay"),
        results={
            "predictions": {
                "mortality": {"probability": 0.012345678901234567, "risk": "low"},
                "readmission": {"probability": 0.4, "risk": "high"},
            },
            "not_scored": {"length_of_stay": "no current inpatient stay to ask about"},
            "forecast": [{"token": "LOINC//2345-7", "lab_bin": 3, "probability": 0.25}],
        },
        data={"resources": {"Patient": 1}, "truncated": False, "last_updated": None},
        timings={"fetch_s": 0.25, "score_s": 0.125},
        created_at=at,
    )


def _tables(url: str) -> set[str]:
    engine = create_store_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _revision(url: str) -> tuple[str | None, str | None]:
    """The database's revision and the newest one in the code."""
    engine = create_store_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            head = ScriptDirectory.from_config(alembic_config(connection)).get_current_head()
    finally:
        engine.dispose()
    return current, head


async def test_opening_creates_the_tables_and_opening_again_is_fine(url: str) -> None:
    first = Store.open(url)
    await first.check()
    assert first.dialect == url.partition(":")[0].partition("+")[0]
    first.close()
    assert _tables(url) == TABLES | {"alembic_version"}
    again = Store.open(url)
    await again.check()
    again.close()
    current, head = _revision(url)
    assert current == head is not None


def _open_and_close(url: str) -> None:
    Store.open(url).close()


def test_worker_processes_opening_an_empty_database_together_all_succeed(url: str) -> None:
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_open_and_close, [url] * 4))
    assert _tables(url) == TABLES | {"alembic_version"}
    assert _revision(url)[0] is not None


def test_the_orm_tables_match_the_migrations(url: str) -> None:
    upgrade(url)
    engine = create_store_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


async def test_downgrade_to_base_and_upgrade_again(store: Store, url: str) -> None:
    await store.record_prediction(_prediction())
    downgrade(url, "base")
    assert _tables(url) == {"alembic_version"}
    assert _revision(url)[0] is None
    upgrade(url)
    assert _tables(url) == TABLES | {"alembic_version"}
    assert await store.predictions(FHIR_A, PATIENT) == []
    await store.record_prediction(_prediction())
    assert len(await store.predictions(FHIR_A, PATIENT)) == 1


async def test_a_prediction_round_trips_with_its_json_and_an_aware_utc_time(
    store: Store,
) -> None:
    prediction = _prediction(at=T0.astimezone(timezone(timedelta(hours=2))))
    stored_id = await store.record_prediction(prediction)
    (row,) = await store.predictions(FHIR_A, PATIENT)
    assert row == PredictionRow(id=stored_id, **vars(prediction))
    assert row.created_at.tzinfo is UTC
    assert row.created_at == T0


async def test_history_is_newest_first_limited_and_only_that_patient_on_that_server(
    store: Store,
) -> None:
    minutes = [3, 0, 4, 1, 2]  # recorded out of order
    for minute in minutes:
        await store.record_prediction(_prediction(at=T0 + timedelta(minutes=minute)))
    await store.record_prediction(_prediction(patient_id="someone-else"))
    await store.record_prediction(_prediction(fhir_base=FHIR_B, at=T0 + timedelta(hours=1)))

    newest = await store.predictions(FHIR_A, PATIENT, limit=3)
    assert [r.created_at for r in newest] == [T0 + timedelta(minutes=m) for m in (4, 3, 2)]
    on_a = await store.predictions(FHIR_A, PATIENT)
    assert len(on_a) == len(minutes)
    assert {(r.patient_id, r.fhir_base) for r in on_a} == {(PATIENT, FHIR_A)}
    anywhere = await store.predictions(None, PATIENT)
    assert len(anywhere) == len(minutes) + 1
    assert anywhere[0].fhir_base == FHIR_B
    assert await store.predictions(FHIR_A, "nobody") == []
    assert await store.predictions(FHIR_B, "someone-else") == []

    tie = await store.record_prediction(_prediction(at=T0 + timedelta(minutes=4)))
    first, second = await store.predictions(FHIR_A, PATIENT, limit=2)
    assert (first.id, first.created_at) == (tie, second.created_at)
    with pytest.raises(ValueError, match="limit"):
        await store.predictions(FHIR_A, PATIENT, limit=0)


async def test_feedback_is_stored_once_per_service_card_outcome_and_time(store: Store) -> None:
    accepted = FeedbackItem(
        card="9b3c6a52-7c1e-4d0e-9a51-0f9e3c2b1a77",
        outcome="accepted",
        outcome_timestamp=T0,
        accepted_suggestions=[{"id": "order-lactate"}],
    )
    overridden = replace(
        accepted,
        outcome="overridden",
        accepted_suggestions=[],
        override_reason={
            "reason": {"system": "http://example.org/reasons", "code": "not-relevant"},
            "userComment": "Patient is on comfort care.",
        },
    )
    same_instant = replace(accepted, outcome_timestamp=T0.astimezone(timezone(-timedelta(hours=5))))

    assert await store.record_feedback("risk", [accepted]) == FeedbackResult(1, 0)
    assert await store.record_feedback("risk", [accepted]) == FeedbackResult(0, 1)
    assert await store.record_feedback("risk", [same_instant]) == FeedbackResult(0, 1)
    assert await store.record_feedback("risk", [overridden, overridden]) == FeedbackResult(1, 1)
    later = replace(accepted, outcome_timestamp=T0 + timedelta(seconds=1))
    assert await store.record_feedback("risk", [later]) == FeedbackResult(1, 0)
    assert await store.record_feedback("other", [accepted]) == FeedbackResult(1, 0)
    assert await store.record_feedback("risk", []) == FeedbackResult(0, 0)

    with store.engine.connect() as connection:
        rows = connection.execute(select(FeedbackRecord).order_by(FeedbackRecord.id)).all()
    assert [(r.service_id, r.outcome, r.outcome_timestamp) for r in rows] == [
        ("risk", "accepted", T0),
        ("risk", "overridden", T0),
        ("risk", "accepted", T0 + timedelta(seconds=1)),
        ("other", "accepted", T0),
    ]
    assert rows[0].accepted_suggestions == [{"id": "order-lactate"}]
    assert rows[0].override_reason is None
    assert rows[1].override_reason == overridden.override_reason
    assert all(r.received_at.tzinfo is UTC for r in rows)


async def test_audit_events_round_trip_newest_first(store: Store) -> None:
    older = AuditEvent(actor="anonymous", action="history", status=401, outcome="no API key", at=T0)
    newer = AuditEvent(
        actor="cds:https://ehr.hospital.example",
        action="cds:patient-view",
        status=200,
        outcome="2 cards",
        patient_id=PATIENT,
        fhir_base=FHIR_A,
        model_version="2025.03.1",
        at=T0.astimezone(timezone(timedelta(hours=9))) + timedelta(seconds=5),
    )
    await store.audit(older)
    await store.audit(newer)
    rows = await store.audit_events()
    assert [AuditEvent(**{k: v for k, v in vars(r).items() if k != "id"}) for r in rows] == [
        newer,
        older,
    ]
    assert all(isinstance(r, AuditRow) and r.at.tzinfo is UTC for r in rows)
    assert await store.audit_events(limit=1) == rows[:1]


async def test_naive_times_are_refused_not_guessed(store: Store) -> None:
    with pytest.raises(StatementError, match="timezone-aware"):
        await store.record_prediction(_prediction(at=datetime(2025, 3, 1, 8, 30)))
    assert await store.predictions(FHIR_A, PATIENT) == []


async def test_workers_sharing_one_database_all_get_their_writes_in(url: str) -> None:
    workers = [Store.open(url) for _ in range(3)]
    async with anyio.create_task_group() as group:
        for n in range(30):
            worker = workers[n % len(workers)]
            group.start_soon(worker.record_prediction, _prediction(at=T0 + timedelta(seconds=n)))
            group.start_soon(worker.audit, AuditEvent("anonymous", "predict", 200, "ok", at=T0))
    assert len(await workers[0].predictions(FHIR_A, PATIENT, limit=100)) == 30
    assert len(await workers[1].audit_events(limit=100)) == 30
    for worker in workers:
        worker.close()


async def test_an_unreachable_database_raises_store_unavailable_without_secrets(
    unreachable_url: str,
) -> None:
    with pytest.raises(StoreUnavailable) as opening:
        Store.open(unreachable_url)
    store = Store(create_store_engine(unreachable_url))
    with pytest.raises(StoreUnavailable) as checking:
        await store.check()
    with pytest.raises(StoreUnavailable) as writing:
        await store.record_prediction(_prediction())
    with pytest.raises(StoreUnavailable) as auditing:
        await store.audit(AuditEvent("anonymous", "predict", 200, "ok", patient_id=PATIENT))
    with pytest.raises(StoreUnavailable) as feedback:
        await store.record_feedback("risk", [FeedbackItem("card", "accepted", T0)])
    store.close()
    for failure in (opening, checking, writing, auditing, feedback):
        assert "database" in str(failure.value)
        report = "".join(traceback.format_exception(failure.value))
        assert PASSWORD not in report
        assert PATIENT not in report


@pytest.mark.parametrize(
    "bad", [f"mysql://root:{PASSWORD}@127.0.0.1/db", f"postgresql://root:{PASSWORD}@h:5x/db"]
)
def test_an_unusable_url_is_refused_without_its_password(bad: str) -> None:
    with pytest.raises(ValueError, match="database") as refused:
        Store.open(bad)
    assert PASSWORD not in "".join(traceback.format_exception(refused.value))


def test_sqlite_is_shared_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    store.close()
