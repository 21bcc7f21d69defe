"""`ehrmamba data build` end to end on real Synthea patients: files, contracts, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from fhir_adapter.files import ExportReader
from fhir_adapter.lab_bins import LabBins
from fhir_adapter.normalize import build_timeline
from fhir_adapter.timeline import EventKind, Timeline
from fhir_adapter.tokenizer import tokenize
from fhir_adapter.vocabulary import Vocabulary
from model.tasks import Task
from tests.training.conftest import PATIENTS
from training.dataset import BuildConfig, build_dataset, read_samples, read_sequences
from training.splits import SPLITS, TRAINING_SPLITS, split_of


@pytest.fixture(scope="module")
def timelines(source: Path) -> dict[str, Timeline]:
    return {r.patient_id: build_timeline(r) for r in ExportReader(source).records()}


def test_cohort_json_has_the_contract_keys(built: Path) -> None:
    cohort = json.loads((built / "cohort.json").read_text())
    assert set(cohort["splits"]) == set(SPLITS)
    assert sum(cohort["splits"][s]["patients"] for s in SPLITS) == PATIENTS
    for split in SPLITS:
        assert set(cohort["splits"][split]) >= {"patients", "tokens"}
    assert set(cohort["tasks"]) == {t.value for t in Task}
    for per_split in cohort["tasks"].values():
        for split in SPLITS:
            assert per_split[split]["positives"] <= per_split[split]["n"]
    hypertension = cohort["tasks"]["hypertension"]
    assert sum(hypertension[s]["n"] for s in SPLITS) == PATIENTS, "one sample per patient"


def test_sequences_equal_tokenizing_again(built: Path, timelines: dict[str, Timeline]) -> None:
    vocab = Vocabulary.load(built / "vocab.json")
    bins = LabBins.load(built / "lab_bins.json")
    seen = 0
    for split in SPLITS:
        for _, pid, seq in read_sequences(built, split):
            assert split_of(pid) == split
            assert seq == tokenize(timelines[pid], vocab, bins)
            seen += 1
    assert seen == PATIENTS


def test_sample_inputs_are_the_prefix_known_at_the_cut(
    built: Path, timelines: dict[str, Timeline]
) -> None:
    vocab = Vocabulary.load(built / "vocab.json")
    bins = LabBins.load(built / "lab_bins.json")
    sequences = {pid: seq for s in SPLITS for _, pid, seq in read_sequences(built, s)}
    samples = read_samples(built).to_pylist()
    timed = [s for s in samples if s["cut_time"] is not None]
    assert {s["task"] for s in timed} >= {"mortality", "readmission"}
    for sample in timed:
        pid = sample["patient_id"]
        expected = tokenize(timelines[pid], vocab, bins, until=sample["cut_time"])
        assert sequences[pid].prefix(sample["cut_length"]) == expected
    for sample in samples:
        if sample["cut_time"] is None:
            assert sample["cut_length"] == len(sequences[sample["patient_id"]])


def test_bins_and_vocabulary_come_from_training_patients_only(
    built: Path, timelines: dict[str, Timeline]
) -> None:
    training = [t for pid, t in timelines.items() if split_of(pid) in TRAINING_SPLITS]
    refit = LabBins.fit(
        (
            (e.code, e.unit, e.value)
            for t in training
            for e in t.events
            if e.kind is EventKind.LAB and e.value is not None
        ),
        min_values=10,
    )
    assert LabBins.load(built / "lab_bins.json").cuts == refit.cuts
    vocab = Vocabulary.load(built / "vocab.json")
    training_codes = {e.code for t in training for e in t.events}
    test_only = {
        e.code
        for pid, t in timelines.items()
        if split_of(pid) == "test"
        for e in t.events
        if e.kind is not EventKind.LAB
    } - training_codes
    assert test_only, "the sample must hold a code seen only in test patients"
    assert not test_only & set(vocab.tokens)


def test_a_second_build_resumes_without_redoing_work(source: Path, tmp_path: Path) -> None:
    config = BuildConfig(sources=(source,), out=tmp_path / "ds", min_count=2)
    first: list[tuple[str, int, int]] = []
    build_dataset(config, lambda stage, done, total: first.append((stage, done, total)))
    parts = sorted((tmp_path / "ds" / "tokens").rglob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    second: list[tuple[str, int, int]] = []
    cohort = build_dataset(config, lambda stage, done, total: second.append((stage, done, total)))
    assert ("timelines", 0, 2) in first
    assert second == [("timelines", 2, 2), ("tokens", 2, 2)], "nothing left to do"
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    assert sum(cohort["splits"][s]["patients"] for s in SPLITS) == PATIENTS


def test_interrupted_token_stage_is_redone_alone(source: Path, tmp_path: Path) -> None:
    config = BuildConfig(sources=(source,), out=tmp_path / "ds", min_count=2)
    whole = build_dataset(config)
    state_path = tmp_path / "ds" / "work" / "state.json"
    state = json.loads(state_path.read_text())
    state["done"].remove("tokens:0-1")  # as if the process died during that job
    state_path.write_text(json.dumps(state))
    calls: list[tuple[str, int, int]] = []
    again = build_dataset(config, lambda stage, done, total: calls.append((stage, done, total)))
    assert ("tokens", 1, 2) in calls
    assert ("tokens", 2, 2) in calls
    assert again == whole


def test_missing_source_is_a_clear_cli_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["data", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "not found" in result.output


def test_display_names_cover_the_vocabulary_from_training_patients(
    built: Path, timelines: dict[str, Timeline]
) -> None:
    vocab = Vocabulary.load(built / "vocab.json")
    displays = json.loads((built / "displays.json").read_text())
    codes = {t.split("#", 1)[0] for t in vocab.tokens if "|" in t}
    assert set(displays) <= codes
    assert len(displays) >= 0.9 * len(codes), "the shared sources name nearly every code"
    seen: dict[str, set[str]] = {}
    for timeline in timelines.values():
        if split_of(timeline.patient.id) in TRAINING_SPLITS:
            for code, display in timeline.source.displays.items():
                seen.setdefault(code, set()).add(display)
    assert all(display in seen[code] for code, display in displays.items())
