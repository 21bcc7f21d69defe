"""The patient cache's entries: round trips through real Redis and the LRU, keys that do not
reveal the patient, poisoned entries read as misses, and merging an incremental fetch."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import JsonObject, PatientRecord
from fhir_adapter.timeline import Timeline
from fhir_adapter.tokenizer import TokenSequence
from model.engine import CachedScan
from model.state import ModelState
from service.cache import Cache, MemoryCache, RedisCache, patient_key
from service.patient_cache import (
    CachedRecord,
    PatientCache,
    StoredScan,
    merge_records,
    sequence_digest,
)
from tests.service.test_predict_cache import REDIS


def _record(resources: list[JsonObject], patient_name: str = "A") -> PatientRecord:
    return PatientRecord(
        patient_id="pat-42",
        patient={"resourceType": "Patient", "id": "pat-42", "name": [{"text": patient_name}]},
        resources=resources,
        source="http://fhir.example/r4",
        medications={"Medication/m1": {"resourceType": "Medication", "id": "m1"}},
        dropped=Counter({"Observation:no_code": 2}),
    )


def _state(seed: int) -> ModelState:
    g = torch.Generator().manual_seed(seed)
    return ModelState(torch.randn(2, 1, 8, 3, generator=g), torch.randn(2, 1, 8, 4, generator=g))


def _sequence(n: int) -> TokenSequence:
    return TokenSequence(
        concept=np.arange(n, dtype=np.int32),
        type=np.zeros(n, dtype=np.int8),
        age=np.linspace(40, 41, n, dtype=np.float32),
        time=np.linspace(2000, 2001, n, dtype=np.float32),
        segment=np.ones(n, dtype=np.int8),
        visit_order=np.arange(n, dtype=np.int32),
        timestamp=np.arange(n, dtype=np.int64) * 60,
    )


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    if request.param == "memory":
        yield MemoryCache()
        return
    redis = RedisCache(REDIS)
    yield redis
    await redis.aclose()


async def test_entries_round_trip_and_keys_hide_the_patient(cache: Cache) -> None:
    patients = PatientCache(cache, secrets.token_bytes(16), ttl=60)
    watermark = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    obs = {"resourceType": "Observation", "id": "o1", "status": "final"}
    await patients.save_record(CachedRecord(_record([obs]), watermark))
    loaded = await patients.load_record("http://fhir.example/r4", "pat-42")
    assert loaded is not None
    assert loaded.watermark == watermark
    assert loaded.record.resources == [obs]
    assert loaded.record.dropped == Counter({"Observation:no_code": 2})
    assert await patients.load_record("http://other.example/r4", "pat-42") is None

    scan = CachedScan(12, _state(1), torch.randn(8), {5: _state(2)})
    digest = sequence_digest(_sequence(20), 12)
    await patients.save_scan("http://fhir.example/r4", "pat-42", "sha", StoredScan(scan, digest))
    back = await patients.load_scan("http://fhir.example/r4", "pat-42", "sha")
    assert back is not None
    assert back.scan.length == 12
    assert torch.equal(back.scan.end_hidden, scan.end_hidden)
    for a, b in zip(back.scan.end_state.layers, scan.end_state.layers, strict=True):
        assert torch.equal(a.ssm, b.ssm)
        assert torch.equal(a.conv, b.conv)
    assert set(back.scan.cut_states) == {5}
    assert await patients.load_scan("http://fhir.example/r4", "pat-42", "other-model") is None

    key = patient_key(patients.secret, "http://fhir.example/r4", "pat-42", "record")
    assert "pat-42" not in key
    assert key != patient_key(secrets.token_bytes(16), "http://fhir.example/r4", "pat-42", "record")


async def test_when_confirmed_is_kept_apart_from_the_record(cache: Cache) -> None:
    """The record's bytes do not change when only the confirmation time does, so the
    memo's digest of them stays valid across warm calls."""
    patients = PatientCache(cache, secrets.token_bytes(16), ttl=60)
    written = await patients.save_record(CachedRecord(_record([]), None, checked_at=100.0))
    key = patient_key(patients.secret, "http://fhir.example/r4", "pat-42", "record")
    before = await cache.get(key)
    await patients.save_checked("http://fhir.example/r4", "pat-42", 250.5)
    assert await cache.get(key) == before
    loaded = await patients.load_record("http://fhir.example/r4", "pat-42")
    assert loaded is not None
    assert loaded.checked_at == 250.5
    assert loaded.digest == written.digest is not None


def _counting_builds(monkeypatch: pytest.MonkeyPatch) -> list[PatientRecord]:
    built: list[PatientRecord] = []
    real = build_timeline

    def counting(record: PatientRecord) -> Timeline:
        built.append(record)
        return real(record)

    monkeypatch.setattr("service.patient_cache.build_timeline", counting)
    return built


async def test_the_memo_skips_decoding_and_normalising_unchanged_bytes(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _counting_builds(monkeypatch)
    writer = PatientCache(cache, b"k" * 16, ttl=60, memo_size=4)
    reader = PatientCache(cache, b"k" * 16, ttl=60, memo_size=4)  # another replica
    obs = {"resourceType": "Observation", "id": "o1", "status": "final"}
    await writer.save_record(CachedRecord(_record([obs]), None))
    first = await reader.load_record("http://fhir.example/r4", "pat-42")
    second = await reader.load_record("http://fhir.example/r4", "pat-42")
    assert first is not None
    assert second is not None
    assert second.record is first.record, "decoded once"
    assert reader.memo.timeline(second) is reader.memo.timeline(first)
    assert len(built) == 1, "normalised once"

    # Another replica writes a changed record: the bytes differ, so it is decoded afresh.
    grown = _record([obs, {"resourceType": "Condition", "id": "c1"}])
    await writer.save_record(CachedRecord(grown, None))
    third = await reader.load_record("http://fhir.example/r4", "pat-42")
    assert third is not None
    assert third.record is not first.record
    assert [r["id"] for r in third.record.resources] == ["o1", "c1"]
    assert reader.memo.timeline(third) is not reader.memo.timeline(first)
    assert len(built) == 2


async def test_the_memo_is_bounded_and_can_be_off() -> None:
    memory = MemoryCache()
    bounded = PatientCache(memory, b"k", ttl=60, memo_size=2)
    for i in range(5):
        record = _record([{"resourceType": "Condition", "id": f"c{i}"}], patient_name=str(i))
        await bounded.save_record(CachedRecord(record, None))
    assert len(bounded.memo) == 2
    off = PatientCache(memory, b"k", ttl=60, memo_size=0)
    a = await off.load_record("http://fhir.example/r4", "pat-42")
    b = await off.load_record("http://fhir.example/r4", "pat-42")
    assert a is not None
    assert b is not None
    assert a.record is not b.record
    assert a.record == b.record
    assert len(off.memo) == 0


async def test_a_scan_covers_only_sequences_that_start_with_its_tokens() -> None:
    seq = _sequence(20)
    stored = StoredScan(CachedScan(12, _state(1), torch.zeros(8)), sequence_digest(seq, 12))
    assert stored.covers(seq)
    assert stored.covers(seq.prefix(12))
    assert not stored.covers(seq.prefix(11))
    changed = _sequence(20)
    changed.concept[3] = 99  # a backdated event changes an early token
    assert not stored.covers(changed)


@pytest.mark.parametrize(
    "poison",
    [b"", b"not json", b'{"patient_id": 1}', b"EHRSC1\xff\xff\xff\xff", b"EHRSC1\x02\0\0\0{}"],
)
async def test_poisoned_entries_read_as_misses(poison: bytes) -> None:
    memory = MemoryCache()
    patients = PatientCache(memory, b"k", ttl=60)
    for kind in ("record", "scan:sha"):
        await memory.set(patient_key(b"k", "http://f", "p", kind), poison)
    assert await patients.load_record("http://f", "p") is None
    assert await patients.load_scan("http://f", "p", "sha") is None


def test_merge_replaces_updated_resources_and_adds_new_ones() -> None:
    old = _record([
        {"resourceType": "Observation", "id": "o1", "status": "preliminary"},
        {"resourceType": "Condition", "id": "c1"},
    ])  # fmt: skip
    new = _record([
        {"resourceType": "Observation", "id": "o1", "status": "final"},
        {"resourceType": "Procedure", "id": "p1"},
    ], patient_name="B")  # fmt: skip
    merged = merge_records(old, new)
    by_id = {(r["resourceType"], r["id"]): r for r in merged.resources}
    assert len(merged.resources) == 3
    assert by_id[("Observation", "o1")]["status"] == "final"
    assert ("Procedure", "p1") in by_id
    assert ("Condition", "c1") in by_id
    assert merged.patient == new.patient
