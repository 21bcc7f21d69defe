"""On a CUDA machine: our PyTorch path against the mamba-ssm kernels, one prepared run.

    python bench/cuda_kernels.py [--out results.json]

Full forward of the compact and paper sizes at 2,048 tokens (batch 1 and 8, float32):
- ``ours_reference``: our model with the plain PyTorch scan (a loop over time steps);
- ``ours_mamba_ssm``: our model dispatching the scan to mamba-ssm's fused kernel;
- ``transformers``: ``transformers.MambaModel`` with the same weights (it uses mamba-ssm
  and causal-conv1d itself when they are installed).
Medians of 3 timed runs after a warm-up, synchronised; ``max_diff`` is the largest absolute
difference of the hidden states from ``ours_reference``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.synthetic import synthetic_batch
from model import scan
from model.config import sized
from model.interop import to_transformers
from model.network import EHRMamba, TokenBatch


def _time(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def _compare(model: EHRMamba, stock: Any, size: str, batch: TokenBatch) -> list[dict[str, Any]]:
    b = int(batch.concept.shape[0])
    kernel = scan.cuda_scan
    scan.cuda_scan = None
    ref_s, ref = _time(partial(_hidden, model, batch))
    rows = [
        {"impl": "ours_reference", "size": size, "batch": b, "median_s": ref_s, "max_diff": 0.0}
    ]
    if kernel is not None:
        scan.cuda_scan = kernel
        fast_s, fast = _time(partial(_hidden, model, batch))
        rows.append(
            {
                "impl": "ours_mamba_ssm",
                "size": size,
                "batch": b,
                "median_s": fast_s,
                "max_diff": float((fast - ref).abs().max()),
            }
        )
    embeds = model.input_embeddings(batch)
    hf_s, hf = _time(lambda: stock(inputs_embeds=embeds).last_hidden_state)
    rows.append(
        {
            "impl": "transformers",
            "size": size,
            "batch": b,
            "median_s": hf_s,
            "max_diff": float((hf - ref).abs().max()),
        }
    )
    return rows


def _hidden(model: EHRMamba, batch: TokenBatch) -> torch.Tensor:
    hidden: torch.Tensor = model(batch)[0]
    return hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"mamba-ssm kernel: {scan.cuda_scan is not None}"
    )
    rows: list[dict[str, Any]] = []
    for size in ("compact", "paper"):
        torch.manual_seed(0)
        model = EHRMamba(sized(size, 500, dropout=0.0)).to(device).eval()
        stock = to_transformers(model).to(device)
        for b in (1, 8):
            with torch.no_grad():
                rows.extend(_compare(model, stock, size, synthetic_batch(b, 2048, 500, device)))
    print("| impl | size | batch | tokens | median s | max diff |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['size']} | {r['batch']} | 2,048 | {r['median_s']:.4f} "
            f"| {r['max_diff']:.1e} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
