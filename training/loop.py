"""One training loop for pretraining and finetuning: AdamW with linear warm-up over the first
10 % of steps then linear decay (the paper's schedule), gradient clipping, validation after
every epoch, early stopping, a checkpoint after every epoch that a rerun resumes from, a
JSON-lines log of losses, and a progress bar.

Under ``torchrun`` (several processes, one per core or GPU, on one or many machines) the
objective is wrapped in ``DistributedDataParallel``: each process takes every
``world``-th batch and gradients are averaged by PyTorch. On CUDA the forward pass runs
under bfloat16 autocast.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.batches import by_length

Batch = TypeVar("Batch")


@dataclass(frozen=True)
class LoopConfig:
    """How long and how hard to train."""

    epochs: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of all steps
    batch_tokens: int = 8192  # padded tokens per batch
    patience: int = 2  # epochs without a better validation loss before stopping
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class Data(Generic[Batch]):
    """Items (by index) with their lengths, and how to make a batch of some of them."""

    lengths: Sequence[int]
    make: Callable[[list[int]], Batch]


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    best_validation: float
    epochs_run: int
    stopped_early: bool
    seconds: float


def fit(
    objective: nn.Module,
    train: Data[Batch],
    validation: Data[Batch],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
    config: LoopConfig,
    run_dir: Path,
    *,
    label: str = "train",
    show_progress: bool = True,
) -> FitResult:
    """Train ``objective`` (a module whose parameters are the model's) and leave the best
    weights, by validation loss, in it, on the CPU wherever it trained. ``loss(module,
    batch)`` is the mean loss of a batch. Everything needed to resume is in ``run_dir``; a
    finished run is not redone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "result.json"
    if done.is_file():
        objective.load_state_dict(
            torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
        )
        return FitResult(**json.loads(done.read_text()))
    rank, world = distributed()
    device = torch.device(config.device)
    objective.to(device)
    wrapped: nn.Module = (
        DistributedDataParallel(objective, find_unused_parameters=True) if world > 1 else objective
    )
    decay, no_decay = _parameter_groups(objective)
    optimiser = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    per_epoch = math.ceil(len(by_length(train.lengths, config.batch_tokens, None)) / world)
    total = max(1, per_epoch * config.epochs)
    warm = max(1, int(config.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (
            (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
        ),
    )
    state = _resume(run_dir, objective, optimiser, schedule, config)
    started = time.perf_counter() - state["seconds"]
    log = (run_dir / "log.jsonl").open("a") if rank == 0 else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    try:
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            torch.manual_seed(config.seed * 1000 + epoch)
            groups = by_length(train.lengths, config.batch_tokens, config.seed * 1000 + epoch)
            mine = groups[rank::world]
            wrapped.train()
            running, steps = 0.0, 0
            with _progress(show_progress and rank == 0) as bar:
                task = bar.add_task(f"{label} epoch {epoch}/{config.epochs}", total=len(mine))
                for indices in mine:
                    with autocast:
                        value = loss(wrapped, _to(train.make(indices), device))
                    optimiser.zero_grad(set_to_none=True)
                    value.backward()  # type: ignore[no-untyped-call]
                    torch.nn.utils.clip_grad_norm_(objective.parameters(), config.grad_clip)
                    optimiser.step()
                    schedule.step()
                    running += float(value.detach())
                    steps += 1
                    bar.update(task, advance=1)
                    if log is not None and steps % 10 == 0:
                        log.write(
                            json.dumps(
                                {
                                    "epoch": epoch,
                                    "step": steps,
                                    "loss": float(value.detach()),
                                    "lr": schedule.get_last_lr()[0],
                                }
                            )
                            + "\n"
                        )
            val = evaluate_loss(objective, validation, loss, config, device)
            improved = val < state["best_validation"]
            if improved:
                state.update(best_validation=val, best_epoch=epoch, bad_epochs=0)
                if rank == 0:
                    torch.save(objective.state_dict(), run_dir / "best.pt")
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            state["seconds"] = time.perf_counter() - started
            if log is not None:
                log.write(
                    json.dumps(
                        {
                            "epoch": epoch,
                            "train_loss": running / max(1, steps),
                            "validation_loss": val,
                            "seconds": state["seconds"],
                        }
                    )
                    + "\n"
                )
                log.flush()
            if rank == 0:
                _checkpoint(run_dir, objective, optimiser, schedule, config, state)
            if state["bad_epochs"] >= config.patience:
                break
    finally:
        if log is not None:
            log.close()
    if world > 1:
        dist.barrier()
    objective.to("cpu")  # scoring and export happen on the CPU
    objective.load_state_dict(
        torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    )
    result = FitResult(
        best_epoch=state["best_epoch"],
        best_validation=state["best_validation"],
        epochs_run=state["epoch"],
        stopped_early=state["epoch"] < config.epochs,
        seconds=time.perf_counter() - started,
    )
    if rank == 0:
        done.write_text(json.dumps(asdict(result)))
    return result


@torch.no_grad()
def evaluate_loss(
    objective: nn.Module,
    data: Data[Batch],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
    config: LoopConfig,
    device: torch.device,
) -> float:
    """Mean of the batch losses weighted by batch size (no dropout)."""
    objective.eval()
    total, count = 0.0, 0
    for indices in by_length(data.lengths, config.batch_tokens, None):
        total += float(loss(objective, _to(data.make(indices), device))) * len(indices)
        count += len(indices)
    objective.train()
    return total / count if count else math.inf


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by ``torchrun``."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and dist.is_torchelastic_launched():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _parameter_groups(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weight decay on matrices only: not on biases, norms, embeddings or the SSM's A and D
    (decaying those would pull the recurrence towards forgetting)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in module.named_parameters():
        is_table = "embeddings" in name or name.endswith(("A_log", ".D"))
        (decay if parameter.ndim >= 2 and not is_table else no_decay).append(parameter)
    return decay, no_decay


def _resume(
    run_dir: Path,
    objective: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    config: LoopConfig,
) -> dict[str, Any]:
    fresh = {
        "epoch": 0,
        "best_validation": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "seconds": 0.0,
    }
    path = run_dir / "last.pt"
    if not path.is_file():
        return fresh
    saved = torch.load(path, map_location=_device_of(objective), weights_only=False)
    if saved["config"] != asdict(config):
        raise ValueError(f"{run_dir} holds a run with other settings; use a new folder")
    objective.load_state_dict(saved["objective"])
    optimiser.load_state_dict(saved["optimiser"])
    schedule.load_state_dict(saved["schedule"])
    return dict(saved["state"])


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _checkpoint(
    run_dir: Path,
    objective: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    config: LoopConfig,
    state: dict[str, Any],
) -> None:
    """Write atomically: a run killed mid-write resumes from the previous epoch."""
    partial = run_dir / "last.pt.partial"
    torch.save(
        {
            "objective": objective.state_dict(),
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "config": asdict(config),
            "state": state,
        },
        partial,
    )
    partial.replace(run_dir / "last.pt")


def _to(batch: Any, device: torch.device) -> Any:
    """Move a batch's tensors (in dataclasses, tuples) to ``device``."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return type(batch)(_to(x, device) for x in batch)
    if hasattr(batch, "__dataclass_fields__"):
        fields = {k: _to(getattr(batch, k), device) for k in batch.__dataclass_fields__}
        return type(batch)(**fields)
    return batch


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not show,
    )
