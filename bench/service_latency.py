"""Service latency as a client sees it (`ehrmamba bench service`).

The service and the FHIR server run as real processes and every call goes over loopback
HTTP, because an in-process test client would hide what a hospital pays for: HTTP and JSON
on both hops, the FHIR server's searches, the store write and the event loop between them.
Everything shares this machine's cores, the benchmark's own client included.

Cases:
- ``predict_cold``: each patient's first ``POST /patients/{id}/predict``: a full FHIR read
  and a scan from the start. Cycling through distinct patients makes every call cold
  without restarting anything.
- ``predict_warm``: the same patients again with nothing new on the FHIR server: the record
  is checked incrementally (one batch of change probes, ``fhir_adapter.changes``) and the
  cached scan state is reused.
- ``predict_warm_x8``: warm calls with 8 in flight, so the micro-batcher can score several
  patients in one engine call.
- ``cds_first``: a ``patient-view`` hook with the whole prefetch (gathered beforehand, as an
  EHR sends it) and a fresh ES384 client JWT per call, once per patient. A call without
  ``fhirServer`` keys its scan state apart from the REST route's, so nothing is cached.
- ``cds_repeat``: the same hook calls again (the scan state is reused; the prefetch is
  parsed and normalised every time).

One extra patient warms the process first (imports, allocator, first engine call) and is
not measured: a cold patient is not a cold process.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.procfs import CpuShare
from bench.stack import ISSUER, load_records, say, served
from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.record import JsonObject
from service.cds.client_token import ClientKey, sign_client_token
from service.cds.services import PREFETCH

CDS_PATH = "/cds-services/ehrmamba-patient-view"
CONCURRENCY = 8
STAGES = ("fetch", "tokenize", "queue", "score", "rest")


@dataclass
class Measurement:
    case: str
    n: int
    median_ms: float
    p95_ms: float
    max_ms: float
    target_ms: float | None  # the p95 must stay below it
    stages_ms: dict[str, float]  # medians of the service's own timings; none for CDS cards
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.target_ms is None else self.p95_ms < self.target_ms


@dataclass
class _Calls:
    """One case's round trips with what each answer said about its own time and cache use."""

    seconds: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    cache: Counter[str] = field(default_factory=Counter)
    tokens: list[int] = field(default_factory=list)

    def add(self, seconds: float, answer: JsonObject | None = None) -> None:
        self.seconds.append(seconds)
        if answer is not None:
            timings = answer["timings"]  # the rest: HTTP, JSON, cache writes, store, audit
            self.stages.append({**timings, "rest_s": seconds - sum(timings.values())})
            self.cache[f"{answer['cache']['record']}/{answer['cache']['state']}"] += 1
            self.tokens.append(answer["data"]["tokens"])

    def measurement(self, case: str, target_ms: float | None, note: str) -> Measurement:
        ms = sorted(s * 1000 for s in self.seconds)
        p95 = statistics.quantiles(ms, n=20, method="inclusive")[-1] if len(ms) > 1 else ms[0]
        stages = (
            {s: statistics.median(t[f"{s}_s"] for t in self.stages) * 1000 for s in STAGES}
            if self.stages
            else {}
        )
        cache = ", ".join(f"{k} {v}" for k, v in sorted(self.cache.items()))
        note = "; ".join(part for part in (cache, note) if part)
        return Measurement(case, len(ms), statistics.median(ms), p95, ms[-1], target_ms,
                           stages, note)  # fmt: skip


def run(data: Path, patients: int, rounds: int) -> list[Measurement]:
    """Start the stack, load ``patients`` (+1 to warm up) shared patients, measure every
    case (``rounds`` passes over the patients for the warm ones) and stop what was started."""
    records = load_records(data, patients + 1)
    key = ClientKey.generate("ES384")
    with served(records, cds_key=key) as stack:
        prefetches = asyncio.run(_prefetches(stack.fhir.base_url, stack.patient_ids))
        cpu = CpuShare()
        done = asyncio.run(_measure(stack.url, key, prefetches, rounds))
        ours, others = cpu.shares()
        say(f"CPU while measuring: ours {ours:.0%} of {os.cpu_count()} cores, "
            f"other processes' {others:.0%}")  # fmt: skip
        return done


async def _prefetches(fhir_base: str, patient_ids: list[str]) -> dict[str, JsonObject]:
    """Each patient's prefetch read back from the server (an EHR sends what its server
    holds, not what a file said)."""
    async with FhirClient(FhirClientConfig(base_url=fhir_base)) as fhir:
        return {patient: await _prefetch(fhir, patient) for patient in patient_ids}


async def _prefetch(fhir: FhirClient, patient_id: str) -> JsonObject:
    """Every prefetch template answered whole: the Patient, and one searchset Bundle per
    search with all its pages."""
    prefetch: JsonObject = {}
    for query in PREFETCH:
        if query.is_read:
            prefetch[query.key] = await fhir.read("Patient", patient_id)
            continue
        found = fhir.search(query.resource_type, query.search_params(patient_id))
        entries: list[JsonObject] = [
            {"fullUrl": f"{fhir.base_url}/{e.resource['resourceType']}/{e.resource['id']}",
             "resource": e.resource, "search": {"mode": e.mode}}
            async for e in found
        ]  # fmt: skip
        prefetch[query.key] = {"resourceType": "Bundle", "type": "searchset",
                               "total": sum(e["search"]["mode"] == "match" for e in entries),
                               "entry": entries}  # fmt: skip
    return prefetch


async def _measure(
    url: str, key: ClientKey, prefetches: dict[str, JsonObject], rounds: int
) -> list[Measurement]:
    warmup, *patients = prefetches
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        client = _Client(http, key, url)
        await client.predict(warmup, _Calls())
        await client.cds(warmup, prefetches[warmup], _Calls())
        done = await _predict_cases(client, patients, rounds)
        done.append(await _concurrent_case(client, patients, rounds))
        for case, passes in (("cds_first", 1), ("cds_repeat", rounds)):
            done.append(await _cds_case(client, case, patients, prefetches, passes))
        return done


async def _predict_cases(client: _Client, patients: list[str], rounds: int) -> list[Measurement]:
    cold = _Calls()
    for patient in patients:
        await client.predict(patient, cold)
    tokens = f"tokens median {statistics.median(cold.tokens):.0f}, max {max(cold.tokens)}"
    say(f"predict_cold: {len(cold.seconds)} calls")
    warm = _Calls()
    started = time.perf_counter()
    for _ in range(rounds):
        for patient in patients:
            await client.predict(patient, warm)
    rate = len(warm.seconds) / (time.perf_counter() - started)
    say(f"predict_warm: {len(warm.seconds)} calls")
    return [
        cold.measurement("predict_cold", 500, tokens),
        warm.measurement("predict_warm", 50, f"one at a time: {rate:.1f} req/s"),
    ]


async def _concurrent_case(client: _Client, patients: list[str], rounds: int) -> Measurement:
    """Warm calls with ``CONCURRENCY`` in flight; the engine's batch sizes come from the
    service's metrics."""
    calls = _Calls()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(patient: str) -> None:
        async with gate:
            await client.predict(patient, calls)

    before = await client.metrics()
    started = time.perf_counter()
    await asyncio.gather(*(one(p) for _ in range(rounds) for p in patients))
    rate = len(calls.seconds) / (time.perf_counter() - started)
    used = _since(before, await client.metrics())
    size = used["batch_size_sum"] / max(used["batch_size_count"], 1)
    case = f"predict_warm_x{CONCURRENCY}"
    say(f"{case}: {len(calls.seconds)} calls")
    note = f"{CONCURRENCY} in flight: {rate:.1f} req/s, mean engine batch {size:.1f}"
    return calls.measurement(case, None, note)


async def _cds_case(
    client: _Client,
    case: str,
    patients: list[str],
    prefetches: dict[str, JsonObject],
    passes: int,
) -> Measurement:
    """Hook calls with the whole prefetch; the cards carry no timings, so the scan-state
    cache use comes from the service's metrics."""
    calls = _Calls()
    before = await client.metrics()
    for _ in range(passes):
        for patient in patients:
            await client.cds(patient, prefetches[patient], calls)
    used = _since(before, await client.metrics())
    state = ", ".join(f"{k} {v:.0f}" for k, v in sorted(used.items()) if k.startswith("state"))
    size = statistics.median(client.body_bytes[p] for p in patients) / 1024
    say(f"{case}: {len(calls.seconds)} calls")
    return calls.measurement(case, 500, f"{state}; body median {size:.0f} KiB")


def _since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


class _Client:
    """An API client and an EHR: times each round trip from request to parsed answer;
    request bodies and JWTs are made before the clock starts."""

    def __init__(self, http: httpx.AsyncClient, key: ClientKey, url: str) -> None:
        self.http = http
        self.key = key
        self.url = url
        self.body_bytes: dict[str, int] = {}

    async def predict(self, patient_id: str, calls: _Calls) -> None:
        started = time.perf_counter()
        response = await self.http.post(f"/patients/{patient_id}/predict")
        answer = _answer(response)
        calls.add(time.perf_counter() - started, answer)

    async def cds(self, patient_id: str, prefetch: JsonObject, calls: _Calls) -> None:
        body = orjson.dumps(
            {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
             "context": {"userId": "Practitioner/bench", "patientId": patient_id},
             "prefetch": prefetch}
        )  # fmt: skip
        self.body_bytes[patient_id] = len(body)
        token = sign_client_token(self.key, ISSUER, self.url + CDS_PATH)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        started = time.perf_counter()
        response = await self.http.post(CDS_PATH, content=body, headers=headers)
        _answer(response)
        calls.add(time.perf_counter() - started)

    async def metrics(self) -> dict[str, float]:
        """The scan-state cache results and engine batch sizes counted so far."""
        text = (await self.http.get("/metrics")).raise_for_status().text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ehrmamba_cache_requests_total":
                    if sample.labels["kind"] == "state":
                        values[f"state {sample.labels['result']}"] = sample.value
                elif sample.name.startswith("ehrmamba_batch_size_"):
                    values[sample.name.removeprefix("ehrmamba_")] = sample.value
        return values


def _answer(response: httpx.Response) -> JsonObject:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url.path}: {response.status_code} "
                           f"{response.text[:500]}")  # fmt: skip
    answer: JsonObject = orjson.loads(response.content)
    return answer


def table(measurements: list[Measurement]) -> str:
    """A Markdown table: latency per case, the target on its p95, and the medians of the
    service's own stage timings with the rest of the round trip."""
    lines = [
        "| case | n | median ms | p95 ms | max ms | target | met | fetch | tokenize | queue "
        "| score | rest | note |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for m in measurements:
        target = "-" if m.target_ms is None else f"p95 < {m.target_ms:.0f} ms"
        met = {None: "-", True: "yes", False: "no"}[m.met]
        stages = " | ".join(f"{m.stages_ms[s]:.1f}" if s in m.stages_ms else "-" for s in STAGES)
        lines.append(f"| {m.case} | {m.n} | {m.median_ms:.1f} | {m.p95_ms:.1f} | "
                     f"{m.max_ms:.1f} | {target} | {met} | {stages} | {m.note} |")  # fmt: skip
    return "\n".join(lines)


def as_json(m: Measurement) -> str:
    return json.dumps({**asdict(m), "met": m.met})
