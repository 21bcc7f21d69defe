"""Artifacts: save then load gives the same model; any altered, missing or extra file is
refused with an error that names it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fhir_adapter.lab_bins import LabBins
from fhir_adapter.vocabulary import Vocabulary
from model.artifact import (
    ArtifactError,
    RiskThresholds,
    ServingConfig,
    attach_displays,
    load_artifact,
    save_artifact,
)
from model.config import ModelConfig
from model.network import EHRMamba, TokenBatch
from model.tasks import Task

VOCAB = Vocabulary(["LOINC|1", "RXNORM|2"], 1)


def _save(path: Path) -> tuple[EHRMamba, str]:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2)
    model = EHRMamba(config).eval()
    serving = ServingConfig(
        model=config, max_length=256, tasks=tuple(Task),
        thresholds={t: RiskThresholds(0.2, 0.5) for t in Task},
    )  # fmt: skip
    digest = save_artifact(
        path, model=model, vocab=VOCAB, bins=LabBins({}, 10), config=serving, version="0.0.1",
        metrics={"tasks": {}}, model_card="# card\n", source_attributes={"name": "test"},
    )  # fmt: skip
    return model, digest


def _batch() -> TokenBatch:
    g = torch.Generator().manual_seed(1)
    shape = (1, 12)
    ones = torch.ones(shape, dtype=torch.int64)
    return TokenBatch(
        concept=torch.randint(0, len(VOCAB), shape, generator=g),
        type=ones,
        age=torch.full(shape, 50.0),
        time=torch.full(shape, 2800.0),
        segment=ones,
        visit_order=ones,
    )


def test_save_then_load_predicts_the_same(tmp_path: Path) -> None:
    model, digest = _save(tmp_path / "a")
    artifact = load_artifact(tmp_path / "a")
    assert artifact.sha256 == digest
    assert artifact.version == "0.0.1"
    assert artifact.config.thresholds[Task.MORTALITY].level(0.3) == "moderate"
    assert artifact.vocab.tokens == VOCAB.tokens
    with torch.no_grad():
        expected, _, _ = model(_batch())
        loaded, _, _ = artifact.model(_batch())
    assert torch.equal(expected, loaded)


@pytest.mark.parametrize("name", ["model.safetensors", "vocab.json", "config.json"])
def test_an_altered_file_is_refused_by_name(tmp_path: Path, name: str) -> None:
    _save(tmp_path / "a")
    target = tmp_path / "a" / name
    target.write_bytes(target.read_bytes() + b" ")
    with pytest.raises(ArtifactError, match=re.escape(name)):
        load_artifact(tmp_path / "a")


def test_missing_and_extra_files_are_refused(tmp_path: Path) -> None:
    _save(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match=r"notes\.txt"):
        load_artifact(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").unlink()
    (tmp_path / "a" / "lab_bins.json").unlink()
    with pytest.raises(ArtifactError, match=r"lab_bins\.json is missing"):
        load_artifact(tmp_path / "a")


def test_not_an_artifact_and_bad_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no manifest"):
        load_artifact(tmp_path)
    _save(tmp_path / "a")
    manifest = tmp_path / "a" / "manifest.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "format": "other/9"}))
    with pytest.raises(ArtifactError, match="format"):
        load_artifact(tmp_path / "a")
    manifest.write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_artifact(tmp_path / "a")


def test_saving_into_a_used_folder_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "a")
    with pytest.raises(ArtifactError, match="not empty"):
        _save(tmp_path / "a")


def test_display_names_are_attached_without_touching_the_weights(tmp_path: Path) -> None:
    _, before = _save(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    after = attach_displays(tmp_path, {"LOINC|1": "Creatinine", "SNOMED|9": "not in vocab"})
    assert after != before
    artifact = load_artifact(tmp_path)  # verifies every hash, displays.json included
    assert artifact.sha256 == after
    assert artifact.displays == {"LOINC|1": "Creatinine"}
    assert artifact.display("LOINC|1#3") == "Creatinine"
    assert artifact.display("[M3]") == "3 months later"
    assert artifact.display("RXNORM|2") is None
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    (tmp_path / "displays.json").write_text("{}")
    with pytest.raises(ArtifactError, match=re.escape("displays.json")):
        load_artifact(tmp_path)
