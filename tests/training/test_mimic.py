"""A MIMIC-IV on FHIR folder end to end: read, ``data build``, ``train``, a loadable artifact.

The folder is generated (tests/support/mimic_fixture.py) in the layout of PhysioNet's
MIMIC-IV demo on FHIR: files named after profiles, MIMIC's own code systems, hospital
admissions known by their identifier, diagnoses without times. Each test pins one thing the
pipeline must get right for such an export to train at all.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline
from fhir_adapter.timeline import Timeline, VisitClass
from model.artifact import load_artifact
from model.tasks import Task
from tests.support.mimic_fixture import PATIENTS, write_mimic_fhir
from training.codesets import load_codesets


@pytest.fixture(scope="module")
def mimic_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mimic_fhir(tmp_path_factory.mktemp("mimic") / "fhir")


@pytest.fixture(scope="module")
def mimic_reader(mimic_source: Path) -> tuple[ExportReader, list[Timeline]]:
    reader = ExportReader(mimic_source)
    return reader, [build_timeline(record) for record in reader.records()]


@pytest.fixture(scope="module")
def mimic_built(mimic_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mimic-dataset")
    result = CliRunner().invoke(app, ["data", "build", str(mimic_source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_every_patient_is_read_and_unused_profiles_are_skipped_by_name(
    mimic_reader: tuple[ExportReader, list[Timeline]],
) -> None:
    """Profile-named files are read by what they hold; chartevents and organisations are not."""
    reader, timelines = mimic_reader
    assert len(timelines) == PATIENTS
    assert reader.stats.skipped_types == Counter(
        {"MimicObservationChartevents": 6, "MimicOrganization": 1}
    )
    assert reader.stats.dropped == Counter()


def test_codes_take_the_standard_short_names(
    mimic_reader: tuple[ExportReader, list[Timeline]],
) -> None:
    """ICD codes under MIMIC's URIs are ICD9CM/ICD10CM/ICD10PCS; nothing falls to OTHER:."""
    _, timelines = mimic_reader
    condition_systems = Counter(c.code.split("|")[0] for t in timelines for c in t.conditions)
    assert set(condition_systems) == {"ICD9CM", "ICD10CM"}
    event_systems = Counter(e.code.split("|")[0] for t in timelines for e in t.events)
    assert set(event_systems) == {
        "ICD9CM",
        "ICD10PCS",
        "MIMIC-LAB",
        "MIMIC-NDC",
        "MIMIC-FORMULARY",
        "MIMIC-MED-NAME",
    }
    assert "MIMIC-LAB|50912" in {e.code for t in timelines for e in t.events}


def test_every_admission_is_an_inpatient_visit_and_diagnoses_attach_to_it(
    mimic_reader: tuple[ExportReader, list[Timeline]],
) -> None:
    """Admissions are inpatient whatever their class (ELECTIVE is AMB in the export); ED
    visits that led nowhere are emergency; untimed diagnoses take their stay's end."""
    _, timelines = mimic_reader
    classes = Counter(v.visit_class for t in timelines for v in t.visits)
    assert set(classes) == {VisitClass.INPATIENT, VisitClass.EMERGENCY}
    assert all(any(v.visit_class is VisitClass.INPATIENT for v in t.visits) for t in timelines)
    for timeline in timelines:
        ends = {v.id: v.end for v in timeline.visits}
        assert all(c.visit_id is not None for c in timeline.conditions)
        assert all(c.time == ends[c.visit_id] for c in timeline.conditions if c.visit_id)
    assert sum(t.patient.deceased_at is not None for t in timelines) > 0


def test_data_build_labels_every_task_from_the_mimic_codes(
    mimic_built: Path, mimic_reader: tuple[ExportReader, list[Timeline]]
) -> None:
    """Each stay task and the three condition tasks have samples of both labels, and the
    condition positives are exactly the patients whose ICD codes the code sets match."""
    cohort = json.loads((mimic_built / "cohort.json").read_text())
    tasks = cohort["tasks"]
    for task in (Task.MORTALITY, Task.LENGTH_OF_STAY, Task.READMISSION, *load_codesets()):
        splits = tasks[task.value].values()
        n, positives = sum(s["n"] for s in splits), sum(s["positives"] for s in splits)
        assert 0 < positives < n, (task, n, positives)
    _, timelines = mimic_reader
    for task, codeset in load_codesets().items():
        matched = sum(any(codeset.matches(c.code) for c in t.conditions) for t in timelines)
        assert sum(s["positives"] for s in tasks[task.value].values()) == matched, task
    assert set(cohort["dropped"]) == {"Observation:outside_visit"}  # the clinic labs
    tokens = json.loads((mimic_built / "vocab.json").read_text())["tokens"]
    assert not [t for t in tokens if t.startswith("OTHER:")]
    assert {"MIMIC-LAB|50912#0", "MIMIC-NDC|51079025520"} <= set(tokens)


def test_train_on_mimic_writes_a_loadable_artifact(mimic_built: Path, tmp_path: Path) -> None:
    """The tiny configuration of tests/training/test_pipeline.py, on the MIMIC dataset."""
    result = CliRunner().invoke(
        app,
        ["train", str(mimic_built), "--out", str(tmp_path / "model"),
         "--work", str(tmp_path / "work"), "--seeds", "1", "--pretrain-epochs", "1",
         "--finetune-epochs", "1", "--hidden-size", "16", "--layers", "1",
         "--max-length", "512", "--method", "ehrmamba_mpf", "--method", "xgboost"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    artifact = load_artifact(tmp_path / "model")
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert artifact.config.tasks
    assert {Task.HYPERTENSION.value, Task.LIPID_METABOLISM.value} <= set(metrics["tasks"])
