"""The selective scan as it is now against the one in another git revision, side by side in
one process (`ehrmamba bench scan-versions --against REV`).

Kernel work is judged by small differences on a machine whose speed drifts by 10-20 %
between runs, so the two versions are timed in alternation within one process, on the
same weights and inputs, and their outputs compared. The other revision's ``model/scan.py``
is read with ``git show`` and imported on its own; everything else (the model, the
matmuls) is the current code, so the difference is the scan's alone.

Cases, compact size, random weights:
- ``forward``: hidden states for one sequence (``tokens``), no gradients: ``fast_scan``.
- ``train_step``: forward and backward of a next-token loss on ``batch`` sequences:
  ``compiled_scan`` with its compiled backward.
"""

from __future__ import annotations

import atexit
import importlib.util
import inspect
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from bench.synthetic import synthetic_batch
from model import scan
from model.config import sized
from model.network import EHRMamba

VOCABULARY = 500


@dataclass(frozen=True)
class Comparison:
    case: str
    tokens: str  # "1 x 2,048": batch x length
    median_s: dict[str, float]  # version -> seconds
    runs: int
    max_difference: float  # outputs (forward) or gradients (train_step), largest |a - b|


def load_revision(revision: str, repo: Path) -> ModuleType:
    """``model/scan.py`` as it was at ``revision``, imported as its own module, with that
    revision's ``model/fastmath.py`` (the helpers its kernels inline and call) beside it."""
    scan_source = _show(revision, "model/scan.py", repo)
    helpers_source = _show(revision, "model/fastmath.py", repo)
    folder = Path(tempfile.mkdtemp(prefix="scan-version-"))
    atexit.register(shutil.rmtree, folder, True)  # the copies and numba's cache of them
    tag = abs(hash(revision)) % 10**8
    helpers = _import(folder / f"fastmath_{tag}.py", helpers_source)
    source = scan_source.replace(
        "from model import fastmath", f"import {helpers.__name__} as fastmath"
    ).replace("from model.fastmath import", f"from {helpers.__name__} import")
    module = _import(folder / f"scan_{tag}.py", source)
    check_compatible(module, revision)
    return module


def _show(revision: str, path: str, repo: Path) -> str:
    """The text of ``path`` at ``revision``."""
    try:
        return subprocess.run(
            ["git", "show", f"{revision}:{path}"], cwd=repo, check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise ValueError(f"cannot read {path} at {revision!r}: {detail.strip()}") from exc


def _import(path: Path, source: str) -> ModuleType:
    """``source`` written to ``path`` and imported as a module named after it."""
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # imports by name, and numba's cache, look it up here
    spec.loader.exec_module(module)
    return module


def check_compatible(module: ModuleType, revision: str) -> None:
    """Refuse a scan the current block cannot call: before the fused forward kernel, the
    scan took delta after its softplus and had no gate."""
    if "gate" not in inspect.signature(module.fast_scan).parameters:
        raise ValueError(
            f"model/scan.py at {revision!r} predates the fused forward kernel (softplus and "
            "gate in the scan's pass), which the current block calls; compare whole "
            "revisions instead (git worktree, `ehrmamba bench model` in each, alternated)"
        )


@contextmanager
def using(module: ModuleType) -> Iterator[None]:
    """Route the model's scans (inference and training) through ``module``'s."""
    saved = scan.fast_scan, scan.compiled_scan
    scan.fast_scan, scan.compiled_scan = module.fast_scan, module.compiled_scan
    try:
        yield
    finally:
        scan.fast_scan, scan.compiled_scan = saved


def run(
    revision: str, repo: Path, *, tokens: int = 2048, batch: int = 4, length: int = 1024,
    rounds: int = 7,
) -> list[Comparison]:  # fmt: skip
    """Both cases, ``rounds`` alternations each (the first is a warm-up, not counted)."""
    versions = {"current": scan, revision: load_revision(revision, repo)}
    torch.manual_seed(0)
    config = sized("compact", VOCABULARY, dropout=0.0)
    model = EHRMamba(config)
    one = synthetic_batch(1, tokens, VOCABULARY)
    many = synthetic_batch(batch, length, VOCABULARY)

    def forward() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model.eval()(one)[0]]

    def train_step() -> list[torch.Tensor]:
        model.train()
        hidden, _, _ = model(many)
        model.next_token_logits(hidden).logsumexp(-1).mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return grads

    return [
        _compare("forward", f"1 x {tokens:,}", versions, forward, rounds),
        _compare("train_step", f"{batch} x {length:,}", versions, train_step, rounds),
    ]


def _compare(
    case: str,
    tokens: str,
    versions: dict[str, ModuleType],
    fn: Callable[[], list[torch.Tensor]],
    rounds: int,
) -> Comparison:
    times: dict[str, list[float]] = {name: [] for name in versions}
    outputs: dict[str, list[torch.Tensor]] = {}
    for round_ in range(rounds):
        for name, module in versions.items():
            with using(module):
                started = time.perf_counter()
                outputs[name] = fn()
                if round_:
                    times[name].append(time.perf_counter() - started)
    first, second = outputs.values()
    difference = max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return Comparison(case, tokens, medians, rounds - 1, difference)


def table(comparisons: list[Comparison]) -> str:
    names = list(comparisons[0].median_s)
    lines = [
        f"| case | tokens | {' | '.join(f'{n} median s' for n in names)} | ratio | runs "
        "| max difference |",
        "|---|---|" + "---:|" * (len(names) + 3),
    ]
    for c in comparisons:
        seconds = [c.median_s[n] for n in names]
        ratio = seconds[1] / seconds[0]
        cells = " | ".join(f"{s:.4f}" for s in seconds)
        lines.append(f"| {c.case} | {c.tokens} | {cells} | {ratio:.2f}x | {c.runs} "
                     f"| {c.max_difference:.1e} |")  # fmt: skip
    return "\n".join(lines)
