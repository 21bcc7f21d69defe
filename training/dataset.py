"""Token datasets on disk: FHIR sources -> timelines -> splits -> bins and vocabulary ->
token sequences and task samples in Parquet, plus ``cohort.json``.

Layout of ``DIR``:

```
vocab.json  lab_bins.json  cohort.json  build.json
tokens/<split>/part-<source>-<partition>.parquet    one row per patient, full sequence
samples/part-<source>-<partition>.parquet           one row per (patient, task sample)
work/timelines-<source>-<partition>.pkl             stage 1 output, kept for resuming
```

A sample does not store its own tokens: its input is the prefix ``cut_length`` of the
patient's sequence (the tokenizer guarantees the input at any cut time is a prefix), so a
patient with twenty stays is stored once. Truncation to the model's window happens when a
batch is made (``fhir_adapter.tokenizer.truncate``).

The work is split into (source, partition) jobs run on a process pool, one partition per
worker, so both cores are used; each stage skips jobs whose outputs exist and whose inputs
are unchanged, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fhir_adapter.files import ExportReader, Partition
from fhir_adapter.lab_bins import LabBins
from fhir_adapter.normalize import build_timeline
from fhir_adapter.timeline import EventKind, Timeline, VisitClass
from fhir_adapter.tokenizer import EVENT_TYPES, TokenSequence, tokenize
from fhir_adapter.vocabulary import TokenType, Vocabulary
from model.tasks import Task
from training.codesets import load_codesets
from training.labels import CohortContext, label_patient, observation_end
from training.splits import SPLITS, TRAINING_SPLITS, split_of

_TOKEN_FIELDS = ("concept", "type", "age", "time", "segment", "visit_order", "timestamp")
_TOKEN_SCHEMA = pa.schema(
    [
        ("source", pa.int16()),
        ("patient_id", pa.string()),
        ("truncated", pa.bool_()),
        ("concept", pa.list_(pa.int32())),
        ("type", pa.list_(pa.int8())),
        ("age", pa.list_(pa.float32())),
        ("time", pa.list_(pa.float32())),
        ("segment", pa.list_(pa.int8())),
        ("visit_order", pa.list_(pa.int32())),
        ("timestamp", pa.list_(pa.int64())),
    ]
)
_SAMPLE_SCHEMA = pa.schema(
    [
        ("source", pa.int16()),
        ("patient_id", pa.string()),
        ("split", pa.string()),
        ("task", pa.string()),
        ("label", pa.int8()),
        ("cut_length", pa.int32()),
        ("cut_time", pa.timestamp("s", tz="UTC")),
        ("visit_id", pa.string()),
    ]
)
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class BuildConfig:
    """What to build; ``workers`` processes share each source by patient partition."""

    sources: tuple[Path, ...]
    out: Path
    min_count: int = 5
    min_lab_values: int = 10
    workers: int = 2


@dataclass
class _Job:
    source: int
    partition: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.source}-{self.partition}"


@dataclass
class _Stage1:
    """What a timeline job leaves besides the timelines themselves."""

    patients: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    skipped_types: Counter[str] = field(default_factory=Counter)
    observation_end: str | None = None
    classes_seen: bool = False


def build_dataset(config: BuildConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the cohort summary."""
    started = time.perf_counter()
    out = config.out
    for sub in ("work", "samples", *(f"tokens/{s}" for s in SPLITS)):
        (out / sub).mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(config)
    state_path = out / "work" / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("fingerprint") != fingerprint:
        state = {"fingerprint": fingerprint, "done": []}
    done: list[str] = state["done"]

    def finish(step: str) -> None:
        done.append(step)
        state_path.write_text(json.dumps(state, indent=1))

    jobs = [
        _Job(s, k, config.workers)
        for s in range(len(config.sources))
        for k in range(config.workers)
    ]
    with ProcessPoolExecutor(max_workers=config.workers) as pool:
        _run(
            pool,
            "timelines",
            [j for j in jobs if f"timelines:{j.name}" not in done],
            lambda j: pool.submit(_timelines_job, config.sources[j.source], j, out),
            lambda j: finish(f"timelines:{j.name}"),
            progress,
            len(jobs),
        )
        contexts = _contexts(config, jobs, out)
        if "fit" not in done:
            vocab, bins = _fit(config, jobs, out)
            vocab.save(out / "vocab.json")
            bins.save(out / "lab_bins.json")
            displays = code_displays(_training_timelines(jobs, out), vocab)
            (out / "displays.json").write_text(json.dumps(displays, indent=1, sort_keys=True))
            finish("fit")
        _run(
            pool,
            "tokens",
            [j for j in jobs if f"tokens:{j.name}" not in done],
            lambda j: pool.submit(_tokens_job, j, out, contexts[j.source]),
            lambda j: finish(f"tokens:{j.name}"),
            progress,
            len(jobs),
        )
    cohort = _cohort(config, jobs, out)
    (out / "cohort.json").write_text(json.dumps(cohort, indent=1, sort_keys=True))
    build = {
        "config": {k: str(v) for k, v in asdict(config).items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "build.json").write_text(json.dumps(build, indent=1))
    return cohort


def _run(
    pool: ProcessPoolExecutor,
    stage: str,
    todo: list[_Job],
    submit: Callable[[_Job], Any],
    on_done: Callable[[_Job], None],
    progress: Progress | None,
    total: int,
) -> None:
    finished = total - len(todo)
    if progress:
        progress(stage, finished, total)
    futures = {submit(job): job for job in todo}
    for future in as_completed(futures):
        future.result()
        on_done(futures[future])
        finished += 1
        if progress:
            progress(stage, finished, total)


# --- stage 1: timelines ---------------------------------------------------------------------


def _timelines_job(source: Path, job: _Job, out: Path) -> None:
    reader = ExportReader(source, partition=Partition(job.partition, job.count))
    timelines = [build_timeline(record) for record in reader.records()]
    facts = _Stage1(patients=len(timelines))
    for timeline in timelines:
        facts.dropped.update(timeline.source.dropped)
        facts.classes_seen |= any(v.visit_class is not VisitClass.OTHER for v in timeline.visits)
    # Source-level counts repeat in every partition; partition 0 reports them.
    facts.dropped.update(
        {
            k: v
            for k, v in reader.stats.dropped.items()
            if job.partition == 0 or k.endswith(":no_patient")
        }
    )
    if job.partition == 0:
        facts.skipped_types.update(reader.stats.skipped_types)
    end = observation_end(timelines)
    facts.observation_end = end.isoformat() if end else None
    _atomic_pickle(out / "work" / f"timelines-{job.name}.pkl", timelines)
    doc = {
        "patients": facts.patients,
        "dropped": dict(facts.dropped),
        "skipped_types": dict(facts.skipped_types),
        "observation_end": facts.observation_end,
        "classes_seen": facts.classes_seen,
    }
    (out / "work" / f"timelines-{job.name}.json").write_text(json.dumps(doc))


def _load_timelines(out: Path, job: _Job) -> list[Timeline]:
    with (out / "work" / f"timelines-{job.name}.pkl").open("rb") as f:
        timelines: list[Timeline] = pickle.load(f)
    return timelines


def _stage1_facts(out: Path, job: _Job) -> _Stage1:
    doc = json.loads((out / "work" / f"timelines-{job.name}.json").read_text())
    return _Stage1(
        doc["patients"],
        Counter(doc["dropped"]),
        Counter(doc["skipped_types"]),
        doc["observation_end"],
        doc["classes_seen"],
    )


def _contexts(config: BuildConfig, jobs: list[_Job], out: Path) -> dict[int, CohortContext]:
    """Per source: where its data stops, and whether it has visit classes at all."""
    contexts: dict[int, CohortContext] = {}
    for source in range(len(config.sources)):
        facts = [_stage1_facts(out, j) for j in jobs if j.source == source]
        ends = [datetime.fromisoformat(f.observation_end) for f in facts if f.observation_end]
        contexts[source] = CohortContext(
            observation_end=max(ends, default=datetime.min.replace(tzinfo=UTC)),
            classes_known=any(f.classes_seen for f in facts),
        )
    return contexts


# --- stage 2: lab bins and vocabulary, from the training splits only ---------------------


def _training_timelines(jobs: list[_Job], out: Path) -> Iterator[Timeline]:
    for job in jobs:
        for timeline in _load_timelines(out, job):
            if split_of(timeline.patient.id) in TRAINING_SPLITS:
                yield timeline


def _fit(config: BuildConfig, jobs: list[_Job], out: Path) -> tuple[Vocabulary, LabBins]:
    bins = LabBins.fit(
        (
            (e.code, e.unit, e.value)
            for timeline in _training_timelines(jobs, out)
            for e in timeline.events
            if e.kind is EventKind.LAB and e.value is not None
        ),
        min_values=config.min_lab_values,
    )
    counts: Counter[str] = Counter()
    kinds: dict[str, TokenType] = {}
    for timeline in _training_timelines(jobs, out):
        for e in timeline.events:
            token = bins.token(e.code, e.unit, e.value) if e.kind is EventKind.LAB else e.code
            counts[token] += 1
            kinds.setdefault(token, EVENT_TYPES[e.kind])
    return Vocabulary.fit(counts, config.min_count, kinds), bins


def code_displays(timelines: Iterable[Timeline], vocab: Vocabulary) -> dict[str, str]:
    """How the sources name each event code the vocabulary holds (the most frequent
    display when they disagree), so forecasts and explanations can be read by people."""
    seen: dict[str, Counter[str]] = {}
    for timeline in timelines:
        for code, display in timeline.source.displays.items():
            seen.setdefault(code, Counter())[display] += 1
    known = {token.split("#", 1)[0] for token in vocab.tokens}
    return {code: names.most_common(1)[0][0] for code, names in seen.items() if code in known}


# --- stage 3: tokens and samples ----------------------------------------------------------


def _tokens_job(job: _Job, out: Path, context: CohortContext) -> None:
    vocab = Vocabulary.load(out / "vocab.json")
    bins = LabBins.load(out / "lab_bins.json")
    codesets = load_codesets()
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    samples: list[dict[str, Any]] = []
    excluded: Counter[str] = Counter()
    for timeline in _load_timelines(out, job):
        pid = timeline.patient.id
        try:
            seq = tokenize(timeline, vocab, bins)
        except ValueError:
            excluded["all:no_birth_date"] += 1
            continue
        split = split_of(pid)
        rows[split].append(_token_row(job.source, pid, seq))
        patient_samples, patient_excluded = label_patient(timeline, codesets, context)
        excluded.update(patient_excluded)
        for sample in patient_samples:
            samples.append({
                "source": job.source, "patient_id": pid, "split": split,
                "task": sample.task.value, "label": sample.label,
                "cut_length": len(seq) if sample.cut is None else seq.cut(sample.cut),
                "cut_time": sample.cut, "visit_id": sample.visit_id,
            })  # fmt: skip
    for split, split_rows in rows.items():
        _atomic_parquet(
            out / "tokens" / split / f"part-{job.name}.parquet",
            pa.Table.from_pylist(split_rows, schema=_TOKEN_SCHEMA),
        )
    _atomic_parquet(
        out / "samples" / f"part-{job.name}.parquet",
        pa.Table.from_pylist(samples, schema=_SAMPLE_SCHEMA),
    )
    (out / "work" / f"excluded-{job.name}.json").write_text(json.dumps(excluded))


def _token_row(source: int, patient_id: str, seq: TokenSequence) -> dict[str, Any]:
    row: dict[str, Any] = {"source": source, "patient_id": patient_id, "truncated": seq.truncated}
    row.update({name: getattr(seq, name) for name in _TOKEN_FIELDS})
    return row


class PatientSequence(NamedTuple):
    """One patient's whole sequence; ``source`` is the index of the build's source."""

    source: int
    patient_id: str
    sequence: TokenSequence


def read_sequences(out: Path, split: str) -> Iterator[PatientSequence]:
    """Every patient of a split, in file order."""
    for part in sorted((out / "tokens" / split).glob("part-*.parquet")):
        table = pq.read_table(part)
        for row in table.to_pylist():
            yield PatientSequence(row["source"], row["patient_id"], _sequence(row))


def read_samples(out: Path) -> pa.Table:
    """All samples as one Arrow table (columns of ``_SAMPLE_SCHEMA``)."""
    parts = sorted((out / "samples").glob("part-*.parquet"))
    return (
        pa.concat_tables([pq.read_table(p) for p in parts])
        if parts
        else (_SAMPLE_SCHEMA.empty_table())
    )


def _sequence(row: dict[str, Any]) -> TokenSequence:
    dtypes = {
        "concept": np.int32,
        "type": np.int8,
        "age": np.float32,
        "time": np.float32,
        "segment": np.int8,
        "visit_order": np.int32,
        "timestamp": np.int64,
    }
    arrays = {name: np.asarray(row[name], dtype=dtypes[name]) for name in _TOKEN_FIELDS}
    return TokenSequence(**arrays, truncated=bool(row["truncated"]))


# --- cohort summary ---------------------------------------------------------------------


def _cohort(config: BuildConfig, jobs: list[_Job], out: Path) -> dict[str, Any]:
    splits: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        patients = tokens = visits = 0
        for part in (out / "tokens" / split).glob("part-*.parquet"):
            table = pq.read_table(part, columns=["concept", "type"])
            patients += table.num_rows
            tokens += sum(len(c) for c in table.column("concept").to_pylist())
            visits += sum(t.count(2) for t in table.column("type").to_pylist())
        splits[split] = {"patients": patients, "tokens": tokens, "visits": visits}
    samples = read_samples(out).to_pylist()
    tasks: dict[str, dict[str, dict[str, int]]] = {}
    for task in Task:
        tasks[task.value] = {}
        for split in SPLITS:
            chosen = [s for s in samples if s["task"] == task.value and s["split"] == split]
            tasks[task.value][split] = {
                "n": len(chosen),
                "positives": sum(s["label"] for s in chosen),
                "patients": len({(s["source"], s["patient_id"]) for s in chosen}),
            }
    excluded: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for job in jobs:
        path = out / "work" / f"excluded-{job.name}.json"
        excluded.update(json.loads(path.read_text()))
        facts = _stage1_facts(out, job)
        dropped.update(facts.dropped)
        skipped.update(facts.skipped_types)
    return {
        "sources": [str(s) for s in config.sources],
        "splits": splits,
        "tasks": tasks,
        "excluded": dict(sorted(excluded.items())),
        "dropped": dict(sorted(dropped.items())),
        "skipped_types": dict(sorted(skipped.items())),
        "vocabulary_size": len(Vocabulary.load(out / "vocab.json")),
        "lab_bins": sum(len(u) for u in LabBins.load(out / "lab_bins.json").cuts.values()),
    }


# --- small helpers --------------------------------------------------------------------------


def _fingerprint(config: BuildConfig) -> dict[str, Any]:
    """Inputs that invalidate earlier work when they change."""
    sources = []
    for path in config.sources:
        stat = path.stat()
        sources.append(
            {"path": str(path.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}
        )
    return {
        "sources": sources,
        "min_count": config.min_count,
        "min_lab_values": config.min_lab_values,
        "workers": config.workers,
    }


def _atomic_pickle(path: Path, value: object) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _atomic_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
