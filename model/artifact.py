"""The served model as a directory (DESIGN.md 4.2), verified file by file on load.

```
config.json              architecture, tokenizer settings, tasks, max length, risk thresholds
model.safetensors        weights (safetensors: loading never runs code)
vocab.json lab_bins.json the frozen tokenizer
metrics.json             evaluation results
model_card.md            for people
source_attributes.json   ONC HTI-1 predictive decision support source attributes
step.onnx                optional: the recurrent step for onnxruntime
displays.json            optional: how the training data named each code, for people
manifest.json            format, version, and the sha256 of every file above
```

``load_artifact`` refuses a missing, extra or altered file with an ``ArtifactError`` that
names it. The artifact's identity (``Artifact.sha256``) is the hash of its manifest, so it
changes whenever any file does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fhir_adapter.lab_bins import LabBins
from fhir_adapter.vocabulary import Vocabulary, structure_words
from model.config import ModelConfig
from model.network import EHRMamba
from model.tasks import Task

FORMAT = "ehrmamba-artifact/1"
_REQUIRED = (
    "config.json",
    "model.safetensors",
    "vocab.json",
    "lab_bins.json",
    "metrics.json",
    "model_card.md",
    "source_attributes.json",
)
_OPTIONAL = ("step.onnx", "displays.json")


class ArtifactError(Exception):
    """The artifact directory is incomplete, altered or not an artifact."""


@dataclass(frozen=True)
class RiskThresholds:
    """Probabilities at which a task's risk is called moderate and high."""

    moderate: float
    high: float

    def level(self, probability: float) -> str:
        if probability >= self.high:
            return "high"
        if probability >= self.moderate:
            return "moderate"
        return "low"


@dataclass(frozen=True)
class ServingConfig:
    """What the service needs besides weights: window, tasks and thresholds."""

    model: ModelConfig
    max_length: int
    tasks: tuple[Task, ...]
    thresholds: dict[Task, RiskThresholds]
    name: str = "ehrmamba"
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model.to_json(),
            "max_length": self.max_length,
            "tasks": [t.value for t in self.tasks],
            "thresholds": {t.value: vars(r) for t, r in self.thresholds.items()},
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ServingConfig:
        return cls(
            model=ModelConfig.from_json(doc["model"]),
            max_length=int(doc["max_length"]),
            tasks=tuple(Task(t) for t in doc["tasks"]),
            thresholds={Task(t): RiskThresholds(**r) for t, r in doc["thresholds"].items()},
            name=str(doc.get("name", "ehrmamba")),
            tokenizer=dict(doc.get("tokenizer", {})),
        )


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified artifact."""

    path: Path
    version: str
    sha256: str
    config: ServingConfig
    model: EHRMamba
    vocab: Vocabulary
    bins: LabBins
    metrics: dict[str, Any]
    onnx_step: Path | None
    displays: dict[str, str] = field(default_factory=dict)

    def display(self, token: str) -> str | None:
        """A person's name for a token: its code's display (``LOINC|2160-0#3`` ->
        ``Creatinine``), or words for a visit or time-gap token (``[M3]`` -> ``3 months
        later``); None when neither is known."""
        return structure_words(token) or self.displays.get(token.split("#", 1)[0])


def save_artifact(
    path: Path,
    *,
    model: EHRMamba,
    vocab: Vocabulary,
    bins: LabBins,
    config: ServingConfig,
    version: str,
    metrics: dict[str, Any],
    model_card: str,
    source_attributes: dict[str, Any],
    onnx_step: Path | None = None,
    displays: dict[str, str] | None = None,
) -> str:
    """Write the artifact into ``path`` (created; must be empty) and return its sha256."""
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise ArtifactError(f"{path} is not empty; refusing to mix artifacts")
    if config.model != model.config:
        raise ArtifactError("serving config does not describe this model")
    (path / "config.json").write_text(json.dumps(config.to_json(), indent=1))
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    vocab.save(path / "vocab.json")
    bins.save(path / "lab_bins.json")
    (path / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    (path / "model_card.md").write_text(model_card)
    (path / "source_attributes.json").write_text(json.dumps(source_attributes, indent=1))
    if onnx_step is not None:
        (path / "step.onnx").write_bytes(onnx_step.read_bytes())
    if displays:
        _write_displays(path, displays)
    return _write_manifest(path, version)


def attach_displays(path: Path, displays: dict[str, str]) -> str:
    """Add (or replace) the display names of a verified artifact and re-sign its manifest;
    the weights and every other file stay as they are. Returns the new sha256."""
    artifact = load_artifact(path)
    known = {token.split("#", 1)[0] for token in artifact.vocab.tokens}
    _write_displays(path, {code: name for code, name in displays.items() if code in known})
    return _write_manifest(path, artifact.version)


def _write_displays(path: Path, displays: dict[str, str]) -> None:
    (path / "displays.json").write_text(json.dumps(displays, indent=1, sort_keys=True))


def _write_manifest(path: Path, version: str) -> str:
    files = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    manifest = {"format": FORMAT, "version": version,
                "files": {name: _sha256(path / name) for name in files}}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return _sha256(path / "manifest.json")


def load_artifact(path: Path) -> Artifact:
    """Load and verify; ArtifactError names the first file that is missing or wrong."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no manifest.json: not a model artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed: dict[str, str] = dict(manifest["files"])
        version = str(manifest["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest_path} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
    missing = [name for name in _REQUIRED if name not in listed]
    if missing:
        raise ArtifactError(f"{path}: manifest lacks {', '.join(missing)}")
    present = {p.name for p in path.iterdir()} - {"manifest.json"}
    unexpected = present - set(listed)
    if unexpected:
        raise ArtifactError(f"{path}: files not in the manifest: {', '.join(sorted(unexpected))}")
    for name, digest in listed.items():
        if name not in (*_REQUIRED, *_OPTIONAL):
            raise ArtifactError(f"{path}: manifest lists an unknown file {name}")
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{path}: {name} is missing")
        if _sha256(file) != digest:
            raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest")
    config = ServingConfig.from_json(json.loads((path / "config.json").read_text()))
    model = EHRMamba(config.model)
    state = load_file(str(path / "model.safetensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not fit the configured model: {exc}") from exc
    model.eval()
    vocab = Vocabulary.load(path / "vocab.json")
    if len(vocab) != config.model.vocab_size:
        raise ArtifactError(f"{path}: vocabulary has {len(vocab)} tokens, model expects "
                            f"{config.model.vocab_size}")  # fmt: skip
    return Artifact(
        path=path,
        version=version,
        sha256=_sha256(manifest_path),
        config=config,
        model=model,
        vocab=vocab,
        bins=LabBins.load(path / "lab_bins.json"),
        metrics=json.loads((path / "metrics.json").read_text()),
        onnx_step=path / "step.onnx" if "step.onnx" in listed else None,
        displays=json.loads((path / "displays.json").read_text())
        if "displays.json" in listed
        else {},
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
