"""Run by ``torchrun`` in the DDP test: the training loop on a toy objective, each process
saving the weights it ends with."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from training.loop import Data, LoopConfig, fit


def main(run_dir: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    data = Data([1] * 64, lambda idx: (x[idx], y[idx]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        error: torch.Tensor = (module(batch[0]).squeeze(-1) - batch[1]) ** 2
        return error.mean()

    config = LoopConfig(epochs=3, learning_rate=0.05, batch_tokens=8)
    result = fit(model, data, data, loss, config, run_dir, show_progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.save({"state": model.state_dict(), "world": world, "best": result.best_validation},
               run_dir / f"rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
