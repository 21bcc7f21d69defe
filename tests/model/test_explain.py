"""Integrated gradients: completeness, the engine's probability, zero for what the model
cannot see, determinism, and per-event sums; on a small random model and on the committed
model with a real patient."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import torch
from captum.attr import IntegratedGradients

from fhir_adapter.lab_bins import LabBins
from fhir_adapter.normalize import build_timeline
from fhir_adapter.timeline import (
    Event,
    EventKind,
    Patient,
    SourceFacts,
    Timeline,
    Visit,
    VisitClass,
)
from fhir_adapter.tokenizer import TokenSequence, close_visit, tokenize, truncate, with_task_token
from fhir_adapter.vocabulary import TokenType, Vocabulary
from model.artifact import load_artifact
from model.batching import collate
from model.config import ModelConfig
from model.engine import Engine, PatientInput
from model.explain import DEFAULT_STEPS, Explainer, Explanation
from model.network import EHRMamba
from model.tasks import Task
from tests.support.samples import require_shared_data, synthea_records

ENGINE_TOL = 1e-5  # explained probability against the engine's
SMALL_GAP = 1e-4  # |completeness gap| on the small model at 64 steps
SERVED_GAP = 0.02  # |completeness gap| on the committed model at DEFAULT_STEPS
MODEL = Path(__file__).parents[2] / "models" / "compact"
T0 = datetime(2024, 1, 1, 8, tzinfo=UTC)
HOUR = timedelta(hours=1)
CODES = ["LOINC|1", "LOINC|2", "RXNORM|3", "SNOMED|4", "CPT|5"]
KINDS = [EventKind.LAB, EventKind.LAB, EventKind.MEDICATION, EventKind.PROCEDURE,
         EventKind.PROCEDURE]  # fmt: skip
VOCAB = Vocabulary(CODES, 1, {"LOINC|1": TokenType.LAB, "RXNORM|3": TokenType.MEDICATION})
BINS = LabBins({}, 10)
MAX_LENGTH = 24


def _record(visits: int, events_per_visit: int, open_last: bool, seed: int = 0) -> TokenSequence:
    """Hourly random events; the second event of every visit is recorded twice (one event
    with two tokens)."""
    g = torch.Generator().manual_seed(seed)
    vs: list[Visit] = []
    events: list[Event] = []
    start = T0
    for v in range(visits):
        end = None if open_last and v == visits - 1 else start + 60 * HOUR
        vs.append(Visit(f"v{v}", start, end, VisitClass.INPATIENT, (f"v{v}",)))
        for e in range(events_per_visit):
            k = int(torch.randint(0, len(CODES), (1,), generator=g))
            event = Event(start + (e + 1) * HOUR, f"v{v}", KINDS[k], CODES[k])
            events += [event, event] if e == 1 else [event]
        start = start + timedelta(days=20 + 3 * v)
    patient = Patient("p", date(1960, 5, 1), "female", False, None)
    return tokenize(Timeline(patient, vs, events, [], SourceFacts("test")), VOCAB, BINS)


@pytest.fixture(scope="module")
def small() -> EHRMamba:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                         dropout=0.0)  # fmt: skip
    return EHRMamba(config).eval()


def _engine_probability(
    model: EHRMamba, vocab: Vocabulary, window: TokenSequence, task: Task, los_cut: int | None
) -> float:
    [result] = Engine(model, vocab).score([PatientInput(window, los_cut=los_cut)], [task])
    return result.probabilities[task]


def _los_cut(window: TokenSequence) -> int:
    return window.cut(datetime.fromtimestamp(int(window.timestamp[-1]), UTC) - 2 * HOUR)


@pytest.mark.parametrize("open_last", [True, False], ids=["open-visit", "closed-visit"])
@pytest.mark.parametrize("task", [Task.MORTALITY, Task.HYPERTENSION, Task.LENGTH_OF_STAY])
def test_complete_and_equal_to_the_engine(small: EHRMamba, open_last: bool, task: Task) -> None:
    record = _record(3, 8, open_last)  # longer than the window: truncated
    window = truncate(record, MAX_LENGTH)
    assert window.truncated
    los_cut = _los_cut(window) if task is Task.LENGTH_OF_STAY else None
    e = Explainer(small, VOCAB, MAX_LENGTH).explain(record, task, los_cut=los_cut, steps=64)
    expected = _engine_probability(small, VOCAB, window, task, los_cut)
    assert e.probability == pytest.approx(expected, abs=ENGINE_TOL)
    assert abs(e.completeness_gap) < SMALL_GAP
    total = sum(t.attribution for t in e.tokens)
    assert total == pytest.approx(e.probability - e.baseline_probability, abs=SMALL_GAP)
    appended = [t for t in e.tokens if t.record_position is None]
    closes = open_last and task is not Task.LENGTH_OF_STAY
    assert [t.kind for t in appended] == (
        [TokenType.VISIT_END, TokenType.REGISTER] if closes else []
    )


def test_tokens_the_model_cannot_see_get_zero(small: EHRMamba) -> None:
    record = _record(3, 8, False)
    explainer = Explainer(small, VOCAB, MAX_LENGTH)
    e = explainer.explain(record, Task.MORTALITY, steps=8)
    unseen = [i for i, t in enumerate(e.tokens) if not t.seen]
    assert len(unseen) == len(record) - len(truncate(record, MAX_LENGTH))
    assert all(e.tokens[i].attribution == 0.0 for i in unseen)
    assert [t.record_position for t in e.tokens] == list(range(len(record)))
    # Another code where the model cannot see it changes nothing at all.
    concept = record.concept.copy()
    first_event = next(i for i in unseen if e.tokens[i].token in CODES)
    concept[first_event] = VOCAB.id(CODES[(CODES.index(e.tokens[first_event].token) + 1) % 5])
    changed = replace(record, concept=concept)
    again = explainer.explain(changed, Task.MORTALITY, steps=8)
    assert [t.attribution for t in again.tokens] == [t.attribution for t in e.tokens]
    assert again.probability == e.probability


def test_after_the_length_of_stay_cut_is_not_seen(small: EHRMamba) -> None:
    record = _record(2, 8, True)
    cut = _los_cut(record)
    e = Explainer(small, VOCAB, None).explain(record, Task.LENGTH_OF_STAY, los_cut=cut, steps=8)
    assert [t.seen for t in e.tokens] == [i < cut for i in range(len(record))]
    assert all(t.attribution == 0.0 for t in e.tokens[cut:])


@pytest.mark.parametrize("steps", [4, 16])
def test_equals_captum_on_the_same_function(small: EHRMamba, steps: int) -> None:
    """The reference: Captum's IntegratedGradients with Gauss-Legendre nodes, given the
    same function of the input embeddings and the same baseline, per input position."""
    record = _record(2, 6, True, seed=2)
    explainer = Explainer(small, VOCAB, MAX_LENGTH)
    ours = explainer.explain(record, Task.MORTALITY, steps=steps)
    scored = close_visit(truncate(record, MAX_LENGTH), VOCAB)
    batch, _ = collate([with_task_token(scored, VOCAB.id(Task.MORTALITY.token))])
    with torch.no_grad():
        x = small.input_embeddings(batch)[0]
    baseline = explainer._baseline(x)

    def mortality(inputs: torch.Tensor) -> torch.Tensor:
        """(a, l, h) -> (a,): blocks, norm, the mortality column at the task token."""
        for block in small.backbone.blocks():
            inputs, _, _ = block(inputs)
        logits = small.task_logits(small.backbone.norm_f(inputs))  # (a, l, t)
        return torch.sigmoid(logits[:, -1, Task.MORTALITY.column])

    reference = (
        IntegratedGradients(mortality)
        .attribute(x[None], baselines=baseline[None], n_steps=steps, method="gausslegendre")[0]
        .sum(-1)
        .detach()
    )  # (l,)
    by_position = {
        t.input_position: t.attribution for t in ours.tokens if t.input_position is not None
    }
    assert sorted(by_position) == list(range(x.shape[0] - 1))  # all but the task token
    for position, attribution in by_position.items():
        assert attribution == pytest.approx(float(reference[position]), abs=1e-6)
    assert float(reference[-1]) == 0.0  # the task token: x equals the baseline there


def test_deterministic(small: EHRMamba) -> None:
    record = _record(3, 6, True, seed=1)
    explainer = Explainer(small, VOCAB, MAX_LENGTH)
    first = explainer.explain(record, Task.READMISSION, steps=16)
    second = explainer.explain(record, Task.READMISSION, steps=16)
    assert first == second


def test_batching_the_steps_changes_nothing(small: EHRMamba) -> None:
    record = _record(2, 6, True, seed=2)
    explainer = Explainer(small, VOCAB, None)
    one_by_one = explainer.explain(record, Task.MORTALITY, steps=12, batch_tokens=1)
    together = explainer.explain(record, Task.MORTALITY, steps=12)
    for a, b in zip(one_by_one.tokens, together.tokens, strict=True):
        assert a.attribution == pytest.approx(b.attribution, abs=1e-7)


def test_events_and_concepts_sum_their_tokens(small: EHRMamba) -> None:
    e = Explainer(small, VOCAB, None).explain(_record(2, 6, False, seed=3), Task.MORTALITY)
    _check_sums(e)
    assert any(len(event.tokens) == 2 for event in e.events)  # the repeated event


def _check_sums(e: Explanation) -> None:
    for event in e.events:
        assert event.attribution == pytest.approx(
            sum(e.tokens[i].attribution for i in event.tokens), abs=1e-9
        )
        members = {(e.tokens[i].visit_order, e.tokens[i].time, e.tokens[i].token)
                   for i in event.tokens}  # fmt: skip
        assert members == {(event.visit_order, event.time, event.token)}
    events = [i for event in e.events for i in event.tokens]
    assert sorted(events) == [
        i for i, t in enumerate(e.tokens)
        if t.kind in (TokenType.LAB, TokenType.MEDICATION, TokenType.PROCEDURE)
    ]  # fmt: skip
    for concept in e.concepts:
        assert concept.attribution == pytest.approx(
            sum(ev.attribution for ev in e.events if ev.code == concept.code), abs=1e-9
        )
    total = sum(t.attribution for t in e.tokens)
    assert sum(ev.attribution for ev in e.events) + e.structure == pytest.approx(total, abs=1e-9)


def test_committed_model_on_a_real_patient(tmp_path: Path) -> None:
    require_shared_data()
    artifact = load_artifact(MODEL)
    [record] = synthea_records(tmp_path, 1)
    timeline = build_timeline(record)
    whole = tokenize(timeline, artifact.vocab, artifact.bins)
    window = tokenize(timeline, artifact.vocab, artifact.bins,
                      max_length=artifact.config.max_length)  # fmt: skip
    explainer = Explainer(artifact.model, artifact.vocab, artifact.config.max_length)
    for task in (Task.MORTALITY, Task.HYPERTENSION):
        e = explainer.explain(whole, task)
        assert e.steps == DEFAULT_STEPS
        expected = _engine_probability(artifact.model, artifact.vocab, window, task, None)
        assert e.probability == pytest.approx(expected, abs=ENGINE_TOL)
        assert abs(e.completeness_gap) < SERVED_GAP, e.completeness_gap
        _check_sums(e)
