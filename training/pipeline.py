"""``ehrmamba train``: from a built dataset to a served artifact and its evidence.

1. Pretrain once with next-token prediction on the pretrain split (validation: held-out
   finetune patients' records).
2. For every seed, finetune copies of the pretrained model: MPF on all tasks at once
   (``ehrmamba_mpf``, the served one), the paper's both-ends MPF, one model per task; and
   fit the XGBoost baseline. Validation patients (a stable fifth of the finetune split)
   choose epochs, thresholds and the served seed; the test split is only scored.
3. Summarise per method, task and source; measure forecasting recall@k and the serving
   cost of the two MPF variants.
4. Export the artifact (DESIGN.md 4.2) with metrics, thresholds, model card, HTI-1 source
   attributes and the ONNX step; write the results page and plots.

Every stage leaves its outputs under ``work``; a rerun skips what is finished, so an
interrupted run resumes (the loop resumes mid-run from its last epoch).
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fhir_adapter.lab_bins import LabBins
from fhir_adapter.tokenizer import TokenSequence, truncate
from fhir_adapter.vocabulary import Vocabulary
from model.artifact import RiskThresholds, ServingConfig, save_artifact
from model.config import sized
from model.network import EHRMamba
from model.onnx_step import export_step
from model.tasks import Task
from training.batches import (
    TaskWindow,
    Variant,
    WindowBatch,
    is_validation,
    next_token_batch,
    pretraining_sequences,
    task_windows,
    window_batch,
)
from training.dataset import read_samples, read_sequences
from training.evaluation import METHODS, Runs, arrays, summarise
from training.loop import Data, FitResult, LoopConfig, distributed, fit
from training.metrics import best_f1_threshold, recall_at_k
from training.model_card import model_card, source_attributes
from training.objectives import NextTokenLoss, PromptedLogits
from training.predictions import (
    Prediction,
    load_predictions,
    next_event_ranks,
    predict_windows,
    save_predictions,
)
from training.results_page import write_results
from training.xgboost_baseline import xgboost_predictions

VARIANTS: tuple[Variant, ...] = ("end", "both_ends")
Windows = dict[tuple[Variant, str], list[TaskWindow]]


@dataclass(frozen=True)
class PipelineConfig:
    """Everything ``ehrmamba train`` decides."""

    dataset: Path
    out: Path
    work: Path
    report: Path | None = None
    size: str = "compact"
    model_overrides: dict[str, int] = field(default_factory=dict)
    max_length: int = 1024
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    pretrain: LoopConfig = field(
        default_factory=lambda: LoopConfig(epochs=4, learning_rate=1e-3, batch_tokens=4096)
    )
    finetune: LoopConfig = field(
        default_factory=lambda: LoopConfig(epochs=6, learning_rate=5e-4, batch_tokens=4096)
    )
    dropout: float = 0.1
    name: str = "ehrmamba-compact"
    version: str = "0.1.0"
    command: str = ""
    show_progress: bool = True


def run(config: PipelineConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns the metrics written to the artifact."""
    started = time.perf_counter()
    vocab = Vocabulary.load(config.dataset / "vocab.json")
    bins = LabBins.load(config.dataset / "lab_bins.json")
    cohort = json.loads((config.dataset / "cohort.json").read_text())
    tasks, skipped = _trainable_tasks(config.dataset)
    for task, reason in skipped.items():
        say(f"task {task}: not trained ({reason})")
    model_config = sized(config.size, len(vocab), dropout=config.dropout, **config.model_overrides)

    say("stage 1: pretraining (next-token prediction)")
    torch.manual_seed(0)
    pretrained = EHRMamba(model_config)
    pre_fit = _pretrain(pretrained, config)
    say(f"  best validation loss {pre_fit.best_validation:.3f} at epoch {pre_fit.best_epoch}")
    weights = copy.deepcopy(pretrained.state_dict())

    windows = {
        (variant, part): task_windows(
            config.dataset,
            split,
            vocab,
            max_length=config.max_length,
            variant=variant,
            tasks=tasks,
            validation=held_out,
        )
        for variant in VARIANTS
        for part, split, held_out in (
            ("train", "finetune", False),
            ("validation", "finetune", True),
            ("test", "test", None),
        )
    }
    stage_seconds: dict[str, float] = {"pretrain": pre_fit.seconds}
    main = distributed()[0] == 0  # under torchrun, process 0 evaluates and exports
    runs: Runs = {}
    fits: dict[tuple[str, int], float] = {}
    served_models: dict[int, dict[str, torch.Tensor]] = {}
    for seed in config.seeds:
        for method in config.methods:
            say(f"stage 2: {method}, seed {seed}")
            folder = config.work / method / f"seed{seed}"
            if method == "xgboost":
                if main:
                    runs.setdefault(method, {})[seed] = _xgboost(
                        folder, windows, tasks, vocab, seed
                    )
                continue
            variant: Variant = "both_ends" if method == "ehrmamba_mpf_both_ends" else "end"
            groups = [[t] for t in tasks] if method == "ehrmamba_per_task" else [list(tasks)]
            validation: list[Prediction] = []
            test: list[Prediction] = []
            for group in groups:
                part = folder / "-".join(t.value for t in group) if len(groups) > 1 else folder
                model = EHRMamba(model_config)
                model.load_state_dict(weights)
                picked = {k: _only(v, group) for k, v in windows.items() if k[0] == variant}
                result = _finetune(model, picked, variant, vocab, config, seed, part)
                fits[(method, seed)] = fits.get((method, seed), 0.0) + result.best_validation
                stage_seconds[method] = stage_seconds.get(method, 0.0) + result.seconds
                if not main:
                    continue  # other torchrun processes only help train
                v, t = _predict_once(part, model, picked, variant, vocab)
                validation += v
                test += t
                if method == "ehrmamba_mpf":
                    served_models[seed] = copy.deepcopy(model.state_dict())
            runs.setdefault(method, {})[seed] = (validation, test)

    if not main:
        return {}
    say("stage 3: evaluation")
    sources = [Path(s).parent.name or Path(s).name for s in cohort["sources"]]
    subsets: dict[str, int | None] = {"combined": None} if len(sources) > 1 else {}
    subsets.update(
        {name: i for i, name in enumerate(sources)} if len(sources) > 1 else {sources[0]: None}
    )
    results = summarise(runs, tasks, subsets)
    served_seed = min(
        (seed for seed in config.seeds if ("ehrmamba_mpf", seed) in fits),
        key=lambda seed: fits[("ehrmamba_mpf", seed)],
    )
    served = EHRMamba(model_config)
    served.load_state_dict(served_models[served_seed])
    served.eval()
    test_sequences = [
        truncate(r.sequence, config.max_length) for r in read_sequences(config.dataset, "test")
    ]
    forecast = {
        "pretrained": _recall(pretrained, test_sequences, vocab),
        "ehrmamba_mpf": _recall(served, test_sequences, vocab),
    }
    cost = _serving_cost(served, windows, vocab)
    validation_served = runs["ehrmamba_mpf"][served_seed][0]
    thresholds = {task: _thresholds(validation_served, task) for task in tasks}

    say("stage 4: export")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = _metrics_document(
        config,
        results,
        tasks,
        skipped,
        forecast,
        cost,
        served_seed,
        pre_fit,
        stage_seconds,
        time.perf_counter() - started,
        peak_mb,
        sources,
    )
    serving = ServingConfig(
        model=model_config,
        max_length=config.max_length,
        tasks=tuple(tasks),
        thresholds=thresholds,
        name=config.name,
        tokenizer={"min_count": cohort.get("min_count"), "sources": sources},
    )
    config.work.mkdir(parents=True, exist_ok=True)
    step = export_step(served, config.work / "step.onnx")
    digest = save_artifact(
        config.out,
        model=served,
        vocab=vocab,
        bins=bins,
        config=serving,
        version=config.version,
        metrics=metrics,
        model_card=model_card(config.name, config.version, metrics, thresholds),
        source_attributes=source_attributes(config.name, config.version, metrics),
        onnx_step=step,
        displays=_displays(config.dataset),
    )
    say(f"artifact {config.out} sha256 {digest}")
    if config.report is not None:
        write_results(config.report, metrics, runs, served_seed)
        say(f"results page {config.report / 'results.md'}")
    return metrics


def _trainable_tasks(dataset: Path) -> tuple[list[Task], dict[str, str]]:
    """Tasks with both classes among the finetune split's training patients; the others
    cannot be learned or evaluated and are reported, not served."""
    labels: dict[str, set[int]] = {}
    for sample in read_samples(dataset).to_pylist():
        if sample["split"] == "finetune" and not is_validation(
            sample["source"], sample["patient_id"]
        ):
            labels.setdefault(sample["task"], set()).add(int(sample["label"]))
    tasks, skipped = [], {}
    for task in Task:
        seen = labels.get(task.value, set())
        if seen == {0, 1}:
            tasks.append(task)
        else:
            skipped[task.value] = (
                "no samples" if not seen else f"only label {min(seen)} in training"
            )
    return tasks, skipped


def _pretrain(model: EHRMamba, config: PipelineConfig) -> FitResult:
    train = list(pretraining_sequences(config.dataset, "pretrain", config.max_length))
    held = [
        truncate(r.sequence, config.max_length)
        for r in read_sequences(config.dataset, "finetune")
        if is_validation(r.source, r.patient_id)
    ]

    def data(seqs: list[TokenSequence]) -> Data[Any]:
        return Data([len(s) for s in seqs], lambda idx: next_token_batch([seqs[i] for i in idx]))

    return fit(
        NextTokenLoss(model),
        data(train),
        data(held),
        lambda m, b: m(*b),
        config.pretrain,
        config.work / "pretrain",
        label="pretrain",
        show_progress=config.show_progress,
    )


def _finetune(
    model: EHRMamba,
    windows: Windows,
    variant: Variant,
    vocab: Vocabulary,
    config: PipelineConfig,
    seed: int,
    folder: Path,
) -> FitResult:
    torch.manual_seed(seed)

    def data(ws: list[TaskWindow]) -> Data[WindowBatch]:
        return Data(
            [len(w.sequence) for w in ws], lambda idx: window_batch([ws[i] for i in idx], vocab)
        )

    def loss(module: nn.Module, batch: WindowBatch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(module(batch), batch.labels)

    return fit(
        PromptedLogits(model),
        data(windows[(variant, "train")]),
        data(windows[(variant, "validation")]),
        loss,
        replace(config.finetune, seed=seed),
        folder,
        label=folder.name,
        show_progress=config.show_progress,
    )


def _predict_once(
    folder: Path,
    model: EHRMamba,
    windows: Windows,
    variant: Variant,
    vocab: Vocabulary,
) -> tuple[list[Prediction], list[Prediction]]:
    paths = folder / "validation.jsonl", folder / "test.jsonl"
    if not all(p.is_file() for p in paths):
        for path, part in zip(paths, ("validation", "test"), strict=True):
            save_predictions(path, predict_windows(model, windows[(variant, part)], vocab))
    return load_predictions(paths[0]), load_predictions(paths[1])


def _xgboost(
    folder: Path,
    windows: Windows,
    tasks: Sequence[Task],
    vocab: Vocabulary,
    seed: int,
) -> tuple[list[Prediction], list[Prediction]]:
    paths = folder / "validation.jsonl", folder / "test.jsonl"
    if not all(p.is_file() for p in paths):
        scored = xgboost_predictions(
            windows[("end", "train")],
            windows[("end", "validation")],
            {"validation": windows[("end", "validation")], "test": windows[("end", "test")]},
            tasks,
            len(vocab),
            seed,
        )
        save_predictions(paths[0], scored["validation"])
        save_predictions(paths[1], scored["test"])
    return load_predictions(paths[0]), load_predictions(paths[1])


def _only(windows: list[TaskWindow], tasks: list[Task]) -> list[TaskWindow]:
    """Windows restricted to prompts of ``tasks`` (dropping windows left empty)."""
    wanted = set(tasks)
    out = []
    for window in windows:
        prompts = tuple(p for p in window.prompts if p.task in wanted)
        if prompts:
            out.append(replace(window, prompts=prompts))
    return out


def _thresholds(validation: list[Prediction], task: Task) -> RiskThresholds:
    """``moderate``: the F1-best threshold on validation patients; ``high``: the median
    score of the validation positives (half of those who had the outcome score at or above
    it), never below ``moderate``."""
    y, p = arrays([q for q in validation if q.task == task.value])
    moderate = best_f1_threshold(y, p)
    high = float(np.median(p[y == 1])) if y.sum() else 0.5
    return RiskThresholds(moderate=moderate, high=max(moderate, high))


def _recall(model: EHRMamba, sequences: list[TokenSequence], vocab: Vocabulary) -> dict[str, float]:
    truth, ranked = next_event_ranks(model, sequences, vocab, k=10)
    return {f"recall@{k}": recall_at_k(truth, ranked, k) for k in (1, 5, 10)} | {
        "positions": len(truth)
    }


def _serving_cost(model: EHRMamba, windows: Windows, vocab: Vocabulary) -> dict[str, Any]:
    """Scoring the whole test split both ways, same model: tokens scanned and seconds."""
    out: dict[str, Any] = {}
    for variant in ("end", "both_ends"):
        chosen = windows[(variant, "test")]
        began = time.perf_counter()
        predict_windows(model, chosen, vocab)
        out[variant] = {
            "windows": len(chosen),
            "tokens_scanned": int(sum(len(w.sequence) for w in chosen)),
            "prompts": int(sum(len(w.prompts) for w in chosen)),
            "seconds": time.perf_counter() - began,
        }
    return out


def _metrics_document(
    config: PipelineConfig,
    results: dict[str, Any],
    tasks: Sequence[Task],
    skipped: dict[str, str],
    forecast: dict[str, Any],
    cost: dict[str, Any],
    served_seed: int,
    pretrain: FitResult,
    stage_seconds: dict[str, float],
    seconds: float,
    peak_mb: float,
    sources: list[str],
) -> dict[str, Any]:
    """``tasks`` holds the headline subset (all test patients): task -> method -> auroc /
    auprc (mean, sd), plus n and positives; ``subsets`` holds every subset in full."""
    headline = results[next(iter(results))]
    return {
        "tasks": {
            task: {
                "n": entry.get("n", 0),
                "positives": entry.get("positives", 0),
                **{m: {k: v[k] for k in ("auroc", "auprc")} for m, v in entry["methods"].items()},
            }
            for task, entry in headline.items()
        },
        "subsets": results,
        "not_trained": skipped,
        "served": {"method": "ehrmamba_mpf", "seed": served_seed},
        "forecast": forecast,
        "serving_cost": cost,
        "pretraining": asdict(pretrain),
        "training": {
            "sources": sources,
            "seeds": list(config.seeds),
            "max_length": config.max_length,
            "pretrain": asdict(config.pretrain),
            "finetune": asdict(config.finetune),
            "wall_seconds": seconds,
            # Training time of every stage, kept across resumed invocations: their sum is the
            # cost of one uninterrupted run less evaluation and export.
            "stage_seconds": stage_seconds,
            "peak_rss_mb": peak_mb,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "command": config.command,
        },
        "trained_tasks": [t.value for t in tasks],
    }


def _displays(dataset: Path) -> dict[str, str]:
    """The dataset's code display names (datasets built before they were kept have none)."""
    path = dataset / "displays.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}
