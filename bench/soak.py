"""A bounded soak and an overload probe (`ehrmamba bench soak`).

The soak offers the served stack (``bench/stack.py``, as for throughput) a steady
open-loop rate of ``POST /patients/{id}/predict`` (``bench/open_loop.py``) for a fixed
number of minutes, rotating over the loaded patients, and reports per minute what came
back and how fast, and the service's resident memory and open descriptors (uvicorn's
supervisor and workers summed, from /proc) before, every minute and after: a leak shows
as growth that does not level off. It also checks that nothing was lost: the service
answered every request sent and recorded every 2xx it answered.

The overload probe then sends a burst far beyond what the service can take, all at once,
to show what the bounded engine queue does with it: refuse quickly with 429 and
``Retry-After``, rather than let requests queue until they time out.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx

from bench import open_loop
from bench.latency import Latency, summarize
from bench.procfs import CpuShare, Footprint, footprint
from bench.stack import PREDICT, Stack, say, served
from fhir_adapter.record import PatientRecord

MINUTE_S = 60.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Window:
    """What came back for the requests due in one minute (or the whole run)."""

    label: str
    sent: int
    statuses: dict[str, int]  # by HTTP status, plus "timeout" and transport errors
    ok: Latency  # of the 2xx answers

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not status.startswith("2"))


@dataclass(frozen=True)
class Sample:
    label: str
    at_s: float
    footprint: Footprint


@dataclass(frozen=True)
class Probe:
    """The burst: how many were refused, how fast, and whether any was lost."""

    sent: int
    rate: float
    statuses: dict[str, int]
    refused: Latency  # the 429s
    ok: Latency  # the 2xx answers
    retry_after: int  # 429s that carried Retry-After
    answered: int  # the service's own count of predicts answered during the burst
    recorded: int  # predictions the store gained

    @property
    def refused_share(self) -> float:
        return self.statuses.get("429", 0) / self.sent


@dataclass(frozen=True)
class Soak:
    rate: float
    minutes: float
    workers: int
    windows: list[Window]  # one per minute, then the whole run
    samples: list[Sample]
    max_late_ms: float  # how far the generator fell behind its schedule, at worst
    answered: int
    recorded: int
    ours_cpu: float
    others_cpu: float
    probe: Probe | None

    @property
    def growth_mib(self) -> float:
        return (self.samples[-1].footprint.rss_bytes - self.samples[0].footprint.rss_bytes) / MIB


def run(
    records: list[PatientRecord],
    *,
    minutes: float,
    rate: float,
    workers: int,
    timeout_s: float,
    burst: int,
) -> Soak:
    """Start the stack with ``records``, warm it, soak it, sample its footprint once more
    after the last answer, then probe it with ``burst`` requests at once (none when 0)."""
    with served(records, workers=workers, redis_cache=True,
                api_key=secrets.token_urlsafe(24)) as stack:  # fmt: skip
        stack.warm()
        pid = stack.service.process.pid
        answered, recorded = stack.answered_predictions(), stack.recorded_predictions()
        cpu, began = CpuShare(), time.perf_counter()
        count = max(1, round(minutes * MINUTE_S * rate))
        outcomes, samples = asyncio.run(_steady(stack, rate, count, timeout_s, pid, began))
        ours, others = cpu.shares()
        answered = stack.settle(answered + count, quiet_s=0.5) - answered
        recorded = stack.recorded_predictions() - recorded
        samples.append(Sample("after", time.perf_counter() - began, footprint(pid)))
        probe = _probe(stack, burst, timeout_s) if burst else None
    windows = [
        _window(f"minute {m + 1}", [o for o in outcomes if int(o.due_s // MINUTE_S) == m])
        for m in range(math.ceil(count / rate / MINUTE_S))
    ]
    windows.append(_window("overall", outcomes))
    late = max(o.late_s for o in outcomes) * 1000
    return Soak(rate, minutes, workers, windows, samples, late, answered, recorded, ours,
                others, probe)  # fmt: skip


async def _steady(
    stack: Stack, rate: float, count: int, timeout_s: float, pid: int, started: float
) -> tuple[list[open_loop.Outcome], list[Sample]]:
    """The open-loop run, with the footprint sampled at its start and every minute."""
    samples = [Sample("before", time.perf_counter() - started, footprint(pid))]

    async def sample_every_minute() -> None:
        while True:
            await asyncio.sleep(MINUTE_S * len(samples) - (time.perf_counter() - started))
            taken = await asyncio.to_thread(footprint, pid)
            samples.append(Sample(f"minute {len(samples)}", time.perf_counter() - started, taken))
            say(f"minute {len(samples) - 1}: service RSS {taken.rss_bytes / MIB:.0f} MiB, "
                f"{taken.open_fds} open files")  # fmt: skip

    async with open_loop.client(stack.url, stack.headers) as http:
        sampler = asyncio.create_task(sample_every_minute())
        try:
            outcomes = await open_loop.run(http, _predicts(http, stack.patient_ids), rate=rate,
                                           count=count, timeout_s=timeout_s)  # fmt: skip
        finally:
            sampler.cancel()
    return outcomes, samples


def _predicts(http: httpx.AsyncClient, ids: list[str]) -> Callable[[int], httpx.Request]:
    """Request i predicts patient i modulo the patients, so every one comes round."""
    return lambda i: http.build_request("POST", PREDICT.format(patient_id=ids[i % len(ids)]))


def _probe(stack: Stack, burst: int, timeout_s: float) -> Probe:
    """``burst`` requests sent together, then the service left to answer all of them."""
    answered, recorded = stack.answered_predictions(), stack.recorded_predictions()
    rate = burst * 100.0  # the whole burst within 10 ms

    async def send() -> list[open_loop.Outcome]:
        async with open_loop.client(stack.url, stack.headers) as http:
            return await open_loop.run(http, _predicts(http, stack.patient_ids), rate=rate,
                                       count=burst, timeout_s=timeout_s)  # fmt: skip

    outcomes = asyncio.run(send())
    answered = stack.settle(answered + burst, quiet_s=0.5) - answered
    recorded = stack.recorded_predictions() - recorded
    refused = [o for o in outcomes if o.status == 429]
    ok = [o.seconds for o in outcomes if o.status is not None and 200 <= o.status < 300]
    return Probe(
        sent=burst,
        rate=rate,
        statuses=_statuses(outcomes),
        refused=summarize([o.seconds for o in refused]),
        ok=summarize(ok),
        retry_after=sum(o.retry_after is not None for o in refused),
        answered=answered,
        recorded=recorded,
    )


def _window(label: str, outcomes: list[open_loop.Outcome]) -> Window:
    ok = [o.seconds for o in outcomes if o.status is not None and 200 <= o.status < 300]
    return Window(label, len(outcomes), _statuses(outcomes), summarize(ok))


def _statuses(outcomes: list[open_loop.Outcome]) -> dict[str, int]:
    counts = Counter(str(o.status) if o.status is not None else str(o.error) for o in outcomes)
    return dict(sorted(counts.items()))


def report(soak: Soak) -> str:
    """The soak's tables (per minute, footprint), its checks, and the probe's table."""
    lines = [
        f"Open loop at {soak.rate:g} requests/s for {soak.minutes:g} min, "
        f"{soak.workers} worker(s); latency of 2xx answers.",
        "",
        "| window | sent | 2xx | not 2xx | median ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for w in soak.windows:
        others = ", ".join(f"{s}: {n}" for s, n in w.statuses.items() if not s.startswith("2"))
        lines.append(f"| {w.label} | {w.sent} | {w.sent - w.errors} | {others or '0'} | "
                     f"{w.ok.cells()} |")  # fmt: skip
    lines += ["", "| when | s | processes | RSS MiB | open fds |", "|---|---:|---:|---:|---:|"]
    for s in soak.samples:
        f = s.footprint
        lines.append(f"| {s.label} | {s.at_s:.0f} | {f.processes} | "
                     f"{f.rss_bytes / MIB:.0f} | {f.open_fds} |")  # fmt: skip
    overall = soak.windows[-1]
    lines += [
        "",
        f"- memory growth, before to after: {soak.growth_mib:+.0f} MiB; open fds "
        f"{soak.samples[0].footprint.open_fds} -> {soak.samples[-1].footprint.open_fds}",
        f"- error rate: {overall.errors / overall.sent:.2%} ({overall.errors} of {overall.sent})",
        f"- sent {overall.sent}, the service answered {soak.answered}, recorded "
        f"{soak.recorded} predictions for {overall.sent - overall.errors} 2xx answers",
        f"- generator at most {soak.max_late_ms:.0f} ms behind its schedule",
        f"- CPU: ours (stack and generator) {soak.ours_cpu:.0%}, other processes "
        f"{soak.others_cpu:.0%} of the cores",
    ]
    if soak.probe is not None:
        lines += ["", probe_table(soak.probe)]
    return "\n".join(lines)


def probe_table(p: Probe) -> str:
    others = ", ".join(f"{s}: {n}" for s, n in p.statuses.items() if s not in ("429",))
    return "\n".join([
        "| burst | 429 | share 429 | 429 with Retry-After | other answers | 429 median ms "
        "| 429 p95 ms | 429 max ms | 2xx median ms | 2xx max ms | answered | recorded |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| {p.sent} | {p.statuses.get('429', 0)} | {p.refused_share:.0%} | {p.retry_after} | "
        f"{others or '0'} | {_ms(p.refused.median_ms)} | {_ms(p.refused.p95_ms)} | "
        f"{_ms(p.refused.max_ms)} | {_ms(p.ok.median_ms)} | {_ms(p.ok.max_ms)} | "
        f"{p.answered} | {p.recorded} |",
    ])  # fmt: skip


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def as_json(soak: Soak) -> str:
    return json.dumps(asdict(soak))
