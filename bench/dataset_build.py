"""Dataset build speed: `ehrmamba data build` with one and with two worker processes.

Each run builds into a fresh temporary folder in its own Python process, so no run reuses
another's work. Peak memory is the largest resident set of any one process of the run (the
main process or a worker), read from ``getrusage``.

    .venv/bin/python bench/dataset_build.py ../shared/data/synthea-r4/bundles.tar.gz --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from training.dataset import BuildConfig, build_dataset
started = time.perf_counter()
cohort = build_dataset(BuildConfig(sources=(Path(sys.argv[1]),), out=Path(sys.argv[2]),
                                   workers=int(sys.argv[3])))
seconds = time.perf_counter() - started
peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
patients = sum(s["patients"] for s in cohort["splits"].values())
print(json.dumps({"seconds": seconds, "peak_mb": peak_kb / 1024, "patients": patients}))
"""


def run_once(source: Path, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-build-") as out:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(source), out, str(workers)],
            check=True,
            capture_output=True,
            text=True,
        )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print("| source | workers | patients | median wall s | runs | peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for source in args.sources:
        for workers in args.workers:
            runs = [run_once(source, workers) for _ in range(args.repeats)]
            print(
                f"| {source} | {workers} | {int(runs[0]['patients']):,} "
                f"| {statistics.median(r['seconds'] for r in runs):.1f} "
                f"| {len(runs)} | {max(r['peak_mb'] for r in runs):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
