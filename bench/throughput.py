"""Predict throughput at rising concurrency (`ehrmamba bench throughput`).

wrk holds ``c`` keep-alive connections open against the served stack (``bench/stack.py``:
FHIR server, ``ehrmamba serve`` with its workers, a private Redis as their shared cache,
an API key on every call) and POSTs ``/patients/{id}/predict`` on each as soon as the
previous answer is in, rotating over the loaded patients. Every patient is predicted once
and wrk runs a warm-up first, so what is measured is the warm path: an incremental FHIR
read and a cached scan state. Answers other than 2xx are reported by status, not dropped:
past what the engine can take the bounded queue answers 429.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass

from bench import wrk
from bench.procfs import CpuShare
from bench.stack import PREDICT, say, served
from fhir_adapter.record import PatientRecord

LEVELS = (1, 4, 16, 64)


@dataclass(frozen=True)
class Level:
    """One concurrency level's wrk result with the CPU shares while it ran."""

    connections: int
    result: wrk.WrkResult
    ours_cpu: float  # the stack and wrk
    others_cpu: float  # every other process on the machine


def run(
    records: list[PatientRecord],
    *,
    levels: tuple[int, ...],
    seconds: float,
    warmup_s: float,
    workers: int,
    timeout_s: float,
) -> list[Level]:
    """Start the stack with ``records``, warm it, then run wrk for ``seconds`` at each
    level in turn, letting the service finish what the previous level left in flight."""
    with served(records, workers=workers, redis_cache=True,
                api_key=secrets.token_urlsafe(24)) as stack:  # fmt: skip
        script = stack.workdir / "predict.lua"
        script.write_text(wrk.lua_script(PREDICT, stack.patient_ids, stack.headers))
        stack.warm()
        answered = stack.answered_predictions()
        warm = wrk.run(stack.url, script, connections=min(levels), seconds=warmup_s,
                       timeout_s=timeout_s)  # fmt: skip
        answered = stack.settle(answered + warm.requests)
        done = []
        for connections in levels:
            cpu = CpuShare()
            result = wrk.run(stack.url, script, connections=connections, seconds=seconds,
                             timeout_s=timeout_s)  # fmt: skip
            ours, others = cpu.shares()
            done.append(Level(connections, result, ours, others))
            say(f"c={connections}: {result.requests} answers, {result.per_second:.1f} req/s, "
                f"other processes took {others:.0%} of the cores")  # fmt: skip
            answered = stack.settle(answered + result.requests)
        return done


def table(levels: list[Level]) -> str:
    lines = [
        "| connections | answers | req/s | 2xx/s | median ms | p95 ms | p99 ms | max ms "
        "| non-2xx | 429 with Retry-After | socket errors | timeouts | ours CPU | others CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for level in levels:
        r = level.result
        non_2xx = ", ".join(f"{s}: {n}" for s, n in r.non_2xx.items()) or "0"
        errors = ", ".join(f"{k} {n}" for k, n in r.socket_errors.items() if n) or "0"
        lines.append(
            f"| {level.connections} | {r.requests} | {r.per_second:.1f} | "
            f"{r.ok_per_second:.1f} | {r.median_ms:.0f} | {r.p95_ms:.0f} | {r.p99_ms:.0f} | "
            f"{r.max_ms:.0f} | {non_2xx} | {r.retry_after} | {errors} | {r.timeouts} | "
            f"{level.ours_cpu:.0%} | {level.others_cpu:.0%} |"
        )
    return "\n".join(lines)


def as_json(level: Level) -> str:
    doc = asdict(level)
    doc["result"] |= {"per_second": level.result.per_second, "cores": os.cpu_count()}
    return json.dumps(doc)
