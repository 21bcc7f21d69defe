"""The one-pass engine against separate full passes: branching, batching, incremental
continuation, forecasting and state bytes."""

from __future__ import annotations

import json
import struct
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fhir_adapter.lab_bins import LabBins
from fhir_adapter.timeline import (
    Event,
    EventKind,
    Patient,
    SourceFacts,
    Timeline,
    Visit,
    VisitClass,
)
from fhir_adapter.tokenizer import TokenSequence, close_visit, tokenize, with_task_token
from fhir_adapter.vocabulary import CLS, PAD, TASK_TOKENS, UNK, TokenType, Vocabulary
from model.batching import collate
from model.config import ModelConfig
from model.engine import CachedScan, Engine, ForecastStep, PatientInput, extends
from model.network import EHRMamba
from model.onnx_step import OnnxStep, export_step
from model.state import from_bytes, to_bytes
from model.tasks import Task

TOL = 1e-5
T0 = datetime(2024, 1, 1, 8, tzinfo=UTC)
HOUR = timedelta(hours=1)
CODES = ["LOINC|1", "LOINC|2", "RXNORM|3", "SNOMED|4", "CPT|5"]
VOCAB = Vocabulary(CODES, 1, {"LOINC|1": TokenType.LAB, "RXNORM|3": TokenType.MEDICATION})
BINS = LabBins({}, 10)
KINDS = [EventKind.LAB, EventKind.LAB, EventKind.MEDICATION, EventKind.PROCEDURE,
         EventKind.PROCEDURE]  # fmt: skip


def _timeline(visits: int, events_per_visit: int, open_last: bool, seed: int) -> Timeline:
    g = torch.Generator().manual_seed(seed)
    vs: list[Visit] = []
    events: list[Event] = []
    start = T0
    for v in range(visits):
        end = None if open_last and v == visits - 1 else start + 60 * HOUR
        vs.append(Visit(f"v{v}", start, end, VisitClass.INPATIENT, (f"v{v}",)))
        for e in range(events_per_visit):
            k = int(torch.randint(0, len(CODES), (1,), generator=g))
            events.append(Event(start + (e + 1) * HOUR, f"v{v}", KINDS[k], CODES[k]))
        start = start + timedelta(days=20 + 3 * v)
    patient = Patient("p", date(1960, 5, 1), "female", False, None)
    return Timeline(patient, vs, events, [], SourceFacts("test"))


def _sequence(visits: int, events: int, open_last: bool, seed: int = 0) -> TokenSequence:
    return tokenize(_timeline(visits, events, open_last, seed), VOCAB, BINS)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                         dropout=0.0)  # fmt: skip
    return Engine(EHRMamba(config), VOCAB)


def _separate(engine: Engine, seq: TokenSequence, task: Task) -> float:
    """The probability from a full pass over the task's whole input, nothing shared."""
    batch, _ = collate([with_task_token(seq, VOCAB.id(task.token))])
    with torch.no_grad():
        hidden, _, _ = engine.model(batch)
        logit = engine.model.task_logit(hidden[0, -1], torch.tensor(task.column))
        return float(torch.sigmoid(logit))


def _los_cut(seq: TokenSequence) -> int:
    visit_starts = (seq.type == TokenType.VISIT_START).nonzero()[0]
    start = datetime.fromtimestamp(int(seq.timestamp[visit_starts[-1]]), UTC)
    return seq.cut(start + 24 * HOUR)


@pytest.mark.parametrize("open_last", [True, False], ids=["open-visit", "closed-visit"])
def test_branching_equals_six_separate_passes(engine: Engine, open_last: bool) -> None:
    seq = _sequence(3, 5, open_last)
    cut = _los_cut(seq)
    [result] = engine.score([PatientInput(seq, los_cut=cut)], list(Task))
    assert set(result.probabilities) == set(Task)
    for task in Task:
        whole = seq.prefix(cut) if task is Task.LENGTH_OF_STAY else close_visit(seq, VOCAB)
        assert result.probabilities[task] == pytest.approx(_separate(engine, whole, task), abs=TOL)
    assert result.scanned_tokens == len(seq)


def test_batched_equals_unbatched(engine: Engine) -> None:
    inputs = [
        PatientInput(_sequence(1, 2, True, seed=1), los_cut=None),
        PatientInput(s := _sequence(4, 6, False, seed=2), los_cut=_los_cut(s)),
        PatientInput(s2 := _sequence(2, 9, True, seed=3), los_cut=_los_cut(s2)),
    ]
    together = engine.score(inputs, list(Task), forecast=3)
    for item, batched in zip(inputs, together, strict=True):
        [alone] = engine.score([item], list(Task), forecast=3)
        assert alone.probabilities.keys() == batched.probabilities.keys()
        for task, p in alone.probabilities.items():
            assert batched.probabilities[task] == pytest.approx(p, abs=TOL)
        assert [f.token for f in alone.forecast] == [f.token for f in batched.forecast]
    assert Task.LENGTH_OF_STAY not in together[0].probabilities


@pytest.mark.parametrize("new_tokens", [4, 12], ids=["cut-in-cache", "cut-in-new-tokens"])
def test_incremental_equals_full(engine: Engine, new_tokens: int) -> None:
    full = _sequence(3, 30, True, seed=4)  # hourly events: the 24 h cut falls before the end
    old = full.prefix(len(full) - new_tokens)
    assert extends(old, full)
    cut = _los_cut(full)
    assert (cut <= len(old)) == (new_tokens == 4)
    [first] = engine.score(
        [PatientInput(old, los_cut=cut if cut <= len(old) else None)], list(Task), forecast=2
    )
    cached = first.cache
    [again] = engine.score([PatientInput(full, los_cut=cut, cached=cached)], list(Task),
                           forecast=2)  # fmt: skip
    [fresh] = engine.score([PatientInput(full, los_cut=cut)], list(Task), forecast=2)
    assert again.scanned_tokens == new_tokens
    assert fresh.scanned_tokens == len(full)
    for task in Task:
        assert again.probabilities[task] == pytest.approx(fresh.probabilities[task], abs=TOL)
    assert [f.token for f in again.forecast] == [f.token for f in fresh.forecast]
    for a, b in zip(again.cache.end_state.layers, fresh.cache.end_state.layers, strict=True):
        assert torch.allclose(a.ssm, b.ssm, atol=TOL)
        assert torch.allclose(a.conv, b.conv, atol=TOL)


def test_nothing_new_rescans_nothing(engine: Engine) -> None:
    seq = _sequence(2, 4, False, seed=5)
    [first] = engine.score([PatientInput(seq)], [Task.MORTALITY])
    [again] = engine.score([PatientInput(seq, cached=first.cache)], [Task.MORTALITY])
    assert again.scanned_tokens == 0
    assert again.probabilities[Task.MORTALITY] == pytest.approx(
        first.probabilities[Task.MORTALITY], abs=TOL
    )


def test_a_changed_history_is_not_an_extension() -> None:
    seq = _sequence(2, 4, False, seed=6)
    changed = _sequence(2, 4, False, seed=7)
    assert not extends(seq, changed)
    assert not extends(seq, seq.prefix(len(seq) - 1))


def test_state_survives_bytes(engine: Engine) -> None:
    [result] = engine.score([PatientInput(_sequence(2, 3, True, seed=8))], [Task.MORTALITY])
    state = result.cache.end_state
    restored = from_bytes(to_bytes(state))
    for a, b in zip(state.layers, restored.layers, strict=True):
        assert torch.equal(a.ssm, b.ssm)
        assert torch.equal(a.conv, b.conv)
    data = to_bytes(state)
    for broken in (b"", b"garbage", data[:-4], data + b"\0\0\0\0", b"EHRMS1\xff\xff\xff\xff{"):
        with pytest.raises(ValueError, match="state"):
            from_bytes(broken)
    cases: list[tuple[list[Any], int, str]] = [
        ([], 4, "missing bytes"),
        ([[2, 3], [2, 4], [3, 3], [2, 4]], 31, "differ in shape"),
        ([[2, -1], [2, 4]], 6, "corrupt model state header"),
        ([[2, "3"], [2, 4]], 14, "corrupt model state header"),
    ]
    for shapes, floats, why in cases:
        with pytest.raises(ValueError, match=why):
            from_bytes(_state_bytes(shapes, floats))


def _state_bytes(shapes: list[Any], floats: int) -> bytes:
    """A header naming ``shapes`` and a body of ``floats`` zeros."""
    header = json.dumps({"shapes": shapes}).encode()
    return b"EHRMS1" + struct.pack("<I", len(header)) + header + np.zeros(floats, "<f4").tobytes()


def test_forecast_is_reproducible_and_well_formed(engine: Engine) -> None:
    item = PatientInput(_sequence(2, 5, True, seed=9))
    [greedy] = engine.score([item], [], forecast=5)
    [greedy_again] = engine.score([item], [], forecast=5)
    assert [f.token for f in greedy.forecast] == [f.token for f in greedy_again.forecast]
    [sampled] = engine.score([item], [], forecast=5, top_p=0.9, seed=3)
    [sampled_again] = engine.score([item], [], forecast=5, top_p=0.9, seed=3)
    assert [f.token for f in sampled.forecast] == [f.token for f in sampled_again.forecast]
    for step in (*greedy.forecast, *sampled.forecast):
        assert step.token not in (PAD, UNK, CLS, *TASK_TOKENS)
        probabilities = [p for _, p in step.candidates]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0.0 < sum(probabilities) <= 1.0 + 1e-6
    assert greedy.forecast[0].token == greedy.forecast[0].candidates[0][0]


def test_empty_sequence_is_refused(engine: Engine) -> None:
    empty = _sequence(1, 1, False).prefix(0)
    with pytest.raises(ValueError, match="empty"):
        engine.score([PatientInput(empty)], [Task.MORTALITY])


@pytest.mark.parametrize("cut", [0, -3, 10_000])
def test_a_length_of_stay_cut_outside_the_sequence_is_refused(engine: Engine, cut: int) -> None:
    seq = _sequence(2, 4, True, seed=13)
    with pytest.raises(ValueError, match="los_cut"):
        engine.score([PatientInput(seq, los_cut=cut)], [Task.LENGTH_OF_STAY])


def test_a_batch_mixing_cached_fresh_and_long_rows_equals_each_alone(engine: Engine) -> None:
    """One patient fully cached (only task tokens to scan), one continuing a cache whose
    length-of-stay cut lies inside it (a row of its own), one scanned from scratch and long
    enough to cross the compiled scan's chunks: batched, each equals its own call."""
    done = _sequence(2, 4, False, seed=14)
    growing = _sequence(3, 30, True, seed=15)
    old = growing.prefix(len(growing) - 4)
    cut = _los_cut(growing)
    assert cut <= len(old)
    long = _sequence(6, 40, True, seed=16)
    assert len(long) > 128
    [done_first] = engine.score([PatientInput(done)], list(Task))
    [old_first] = engine.score([PatientInput(old, los_cut=cut)], list(Task))
    inputs = [
        PatientInput(done, cached=done_first.cache),
        PatientInput(growing, los_cut=cut, cached=old_first.cache),
        PatientInput(long, los_cut=_los_cut(long)),
    ]
    together = engine.score(inputs, list(Task), forecast=2)
    assert [r.scanned_tokens for r in together] == [0, 4, len(long)]
    for item, batched in zip(inputs, together, strict=True):
        [alone] = engine.score([PatientInput(item.sequence, los_cut=item.los_cut)], list(Task),
                               forecast=2)  # fmt: skip
        assert batched.probabilities.keys() == alone.probabilities.keys()
        for task, p in alone.probabilities.items():
            assert batched.probabilities[task] == pytest.approx(p, abs=TOL), task
        assert [f.token for f in batched.forecast] == [f.token for f in alone.forecast]


def test_cache_entry_holds_the_length_of_stay_state(engine: Engine) -> None:
    seq = _sequence(2, 6, True, seed=10)
    cut = _los_cut(seq)
    [result] = engine.score([PatientInput(seq, los_cut=cut)], [Task.LENGTH_OF_STAY])
    assert isinstance(result.cache, CachedScan)
    assert set(result.cache.cut_states) == {cut}


def test_onnx_step_backend_gives_the_same_results(engine: Engine, tmp_path: Path) -> None:
    onnx = Engine(engine.model, VOCAB, OnnxStep(export_step(engine.model, tmp_path / "s.onnx")))
    inputs = [
        PatientInput(s := _sequence(3, 30, True, seed=11), los_cut=_los_cut(s)),
        PatientInput(_sequence(2, 5, False, seed=12)),
    ]
    torch_results = engine.score(inputs, list(Task), forecast=4)
    onnx_results = onnx.score(inputs, list(Task), forecast=4)
    for a, b in zip(torch_results, onnx_results, strict=True):
        assert a.probabilities.keys() == b.probabilities.keys()
        for task, p in a.probabilities.items():
            assert b.probabilities[task] == pytest.approx(p, abs=1e-4)
        assert [f.token for f in a.forecast] == [f.token for f in b.forecast]


def test_forecast_steps_decode_codes_and_lab_bins() -> None:
    lab = ForecastStep("LOINC|2345-7#3", 0.4, ())
    assert (lab.code, lab.lab_bin) == ("LOINC|2345-7", 3)
    drug = ForecastStep("RXNORM|197361", 0.2, ())
    assert (drug.code, drug.lab_bin) == ("RXNORM|197361", None)
    assert ForecastStep("[VE]", 0.1, ()).lab_bin is None


def test_each_task_reads_its_own_column_of_the_clinical_head(engine: Engine) -> None:
    """With the head's weights zeroed, a task's probability is the sigmoid of its own
    column's bias: the engine picks each task's column, whatever the order of the pairs."""
    model = EHRMamba(engine.model.config)
    model.load_state_dict(engine.model.state_dict())
    head = model.clinical_head[1]
    assert isinstance(head, torch.nn.Linear)
    biases = torch.linspace(-2.0, 2.0, len(Task))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(biases)
    seq = _sequence(3, 30, True, seed=11)
    tasks = list(reversed(Task))
    (result,) = Engine(model, VOCAB).score([PatientInput(seq, los_cut=_los_cut(seq))], tasks)
    assert set(result.probabilities) == set(Task)
    for task, p in result.probabilities.items():
        assert p == pytest.approx(float(torch.sigmoid(biases[task.column])), abs=1e-6)
