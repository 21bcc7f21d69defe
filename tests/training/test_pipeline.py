"""``ehrmamba train`` end to end on a small built dataset with a tiny model: every method runs,
the artifact loads and scores exactly what evaluation scored, and metrics.json has the
shape the service and the docs read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from fhir_adapter.tokenizer import is_visit_open
from model.artifact import load_artifact
from model.engine import Engine, PatientInput
from model.tasks import Task
from training.dataset import read_samples, read_sequences
from training.evaluation import METHODS
from training.predictions import load_predictions


@pytest.fixture(scope="module")
def trained(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    result = CliRunner().invoke(
        app,
        ["train", str(built), "--out", str(root / "model"), "--work", str(root / "work"),
         "--report", str(root / "report"), "--seeds", "2", "--pretrain-epochs", "1",
         "--finetune-epochs", "2", "--hidden-size", "16", "--layers", "1",
         "--max-length", "4096"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def test_metrics_hold_every_method_with_mean_and_sd(trained: Path) -> None:
    metrics = json.loads((trained / "model" / "metrics.json").read_text())
    assert metrics["tasks"], "at least one task must be trainable"
    for task, entry in metrics["tasks"].items():
        Task(task)
        assert entry["n"] > 0
        assert 0 <= entry["positives"] <= entry["n"]
        for method in METHODS:
            for name in ("auroc", "auprc"):
                assert set(entry[method][name]) == {"mean", "sd"}
    assert metrics["not_trained"].keys().isdisjoint(metrics["tasks"])
    assert set(metrics["tasks"]) | set(metrics["not_trained"]) == {t.value for t in Task}
    assert {"end", "both_ends"} == set(metrics["serving_cost"])
    cost = metrics["serving_cost"]
    assert cost["both_ends"]["tokens_scanned"] > cost["end"]["tokens_scanned"]
    assert (trained / "report" / "results.md").is_file()
    assert list((trained / "report").glob("*.png"))


def test_the_exported_artifact_scores_what_evaluation_scored(built: Path, trained: Path) -> None:
    artifact = load_artifact(trained / "model")
    assert (trained / "model" / "step.onnx").is_file()
    assert artifact.config.tasks
    served = json.loads((trained / "model" / "metrics.json").read_text())["served"]
    saved = load_predictions(
        trained / "work" / "ehrmamba_mpf" / f"seed{served['seed']}" / "test.jsonl"
    )
    sequences = {(r.source, r.patient_id): r.sequence for r in read_sequences(built, "test")}
    cuts = {(s["source"], s["patient_id"], s["task"], s["visit_id"] or ""): s["cut_length"]
            for s in read_samples(built).to_pylist() if s["split"] == "test"}  # fmt: skip
    engine = Engine(artifact.model, artifact.vocab)
    compared = 0
    for p in saved:
        task = Task(p.task)
        prefix = sequences[(p.source, p.patient_id)].prefix(
            cuts[(p.source, p.patient_id, p.task, p.visit_id)]
        )
        if task is Task.LENGTH_OF_STAY:
            item = PatientInput(prefix, los_cut=len(prefix))
        elif is_visit_open(prefix):
            continue  # the engine would close the visit first, as serving must
        else:
            item = PatientInput(prefix)
        probability = engine.score([item], [task])[0].probabilities[task]
        # float32: batched and single scans of up to 2,000 tokens round differently
        assert probability == pytest.approx(p.probability, abs=2e-4), p
        compared += 1
    assert compared >= len(saved) // 2
