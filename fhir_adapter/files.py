"""Reading FHIR export files into per-patient records, streaming.

Sources: NDJSON (``.ndjson``, ``.ndjson.gz``), a Bulk Data export folder with its
``manifest.json``, Bundle files (transaction, batch, collection or searchset, with
``urn:uuid`` references resolved), folders of any of these, and tar archives of either.
A MIMIC-IV on FHIR folder (``MimicPatient.ndjson.gz``, ``MimicObservationLabevents.ndjson.gz``,
...) is an NDJSON folder whose files are named after profiles rather than resource types.

Export files are split by resource type, not by patient, so records are assembled in a
temporary SQLite file rather than in memory: the reader holds one patient's resources at a
time however large the export is.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from fhir_adapter.record import READ_TYPES, JsonObject, PatientRecord
from fhir_adapter.references import patient_id_of, rewrite_references

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")
_IGNORED_NAMES = {"manifest.json"}
_BATCH = 2000
# MIMIC-IV on FHIR files named after profiles the model does not use, skipped unparsed: the
# observations are charted ICU items, output and date events and microbiology (chartevents
# alone is most of the export); the rest are types the adapter does not read. Every other
# ``Mimic*`` file is parsed and its resources filtered by type like any other file's.
_MIMIC_SKIPPED = frozenset(
    {
        "MimicObservationChartevents",
        "MimicObservationDatetimeevents",
        "MimicObservationOutputevents",
        "MimicObservationMicroTest",
        "MimicObservationMicroOrg",
        "MimicObservationMicroSusc",
        "MimicMedicationDispense",
        "MimicMedicationDispenseED",
        "MimicMedicationStatementED",
        "MimicSpecimen",
        "MimicSpecimenLab",
        "MimicLocation",
        "MimicOrganization",
    }
)


@dataclass(slots=True)
class ReadStats:
    """What a file source held beyond the records themselves.

    ``dropped`` counts resources no record can own (``source:malformed_json``,
    ``Observation:no_subject``, ``Observation:no_patient`` when the Patient is missing,
    ``Medication:no_id``);
    ``skipped_types`` counts well-formed resources of types the adapter does not read.
    """

    files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    skipped_types: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Partition:
    """Patients whose id hashes to ``index`` of ``count``: lets workers share one source."""

    index: int
    count: int

    def __contains__(self, patient_id: str) -> bool:
        digest = hashlib.blake2b(patient_id.encode("utf-8", "surrogatepass"), digest_size=8)
        return int.from_bytes(digest.digest(), "big") % self.count == self.index


class ExportReader:
    """Iterate the patient records in one file source.

    >>> reader = ExportReader(Path("export/"))
    >>> for record in reader.records(): ...
    >>> reader.stats.dropped

    With a ``partition`` only that partition's patients are assembled. Every partition
    still reads the whole source, so source-level counts (malformed lines, skipped types,
    resources without a subject) are the same in each; only ``no_patient`` differs.
    """

    def __init__(
        self, path: Path, label: str | None = None, partition: Partition | None = None
    ) -> None:
        self.path = path
        self.label = label or str(path)
        self.partition = partition
        self.stats = ReadStats()

    def records(self) -> Iterator[PatientRecord]:
        """One record per patient id, in id order; each holds only that patient's resources."""
        with tempfile.TemporaryDirectory(prefix="ehrmamba-group-") as tmp:
            db = sqlite3.connect(Path(tmp) / "group.sqlite")
            try:
                db.execute("CREATE TABLE res (pid TEXT, type TEXT, body BLOB)")
                medications = self._spill(db)
                db.execute("CREATE INDEX res_pid ON res (pid)")
                yield from self._assemble(db, medications)
            finally:
                db.close()

    def _spill(self, db: sqlite3.Connection) -> dict[str, JsonObject]:
        medications: dict[str, JsonObject] = {}
        batch: list[tuple[str, str, bytes]] = []
        for resource in self.resources():
            rtype = resource["resourceType"]
            if rtype == "Medication":
                key = f"Medication/{resource.get('id')}"
                if not isinstance(resource.get("id"), str):  # nothing can reference it
                    self.stats.dropped["Medication:no_id"] += 1
                elif key in medications:  # the first read is kept, the repeat counted
                    self.stats.dropped["Medication:duplicate_id"] += 1
                else:
                    medications[key] = resource
                continue
            pid = patient_id_of(resource)
            if pid is None:
                self.stats.dropped[f"{rtype}:no_subject"] += 1
                continue
            if self.partition is not None and pid not in self.partition:
                continue
            try:
                body = orjson.dumps(resource)
            except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
                self.stats.dropped["source:malformed_json"] += 1
                continue
            batch.append((pid, rtype, body))
            if len(batch) >= _BATCH:
                db.executemany("INSERT INTO res VALUES (?, ?, ?)", batch)
                batch.clear()
        db.executemany("INSERT INTO res VALUES (?, ?, ?)", batch)
        return medications

    def _assemble(
        self, db: sqlite3.Connection, medications: dict[str, JsonObject]
    ) -> Iterator[PatientRecord]:
        current: PatientRecord | None = None
        for pid, rtype, body in db.execute("SELECT pid, type, body FROM res ORDER BY pid, rowid"):
            if current is None or current.patient_id != pid:
                if current is not None:
                    yield from self._complete(current)
                current = PatientRecord(pid, None, [], self.label, medications)
            resource = orjson.loads(body)
            if rtype == "Patient":
                if current.patient is not None:
                    current.dropped["Patient:duplicate"] += 1
                current.patient = resource
            else:
                current.resources.append(resource)
        if current is not None:
            yield from self._complete(current)

    def _complete(self, record: PatientRecord) -> Iterator[PatientRecord]:
        if record.patient is not None:
            yield record
            return
        for resource in record.resources:
            self.stats.dropped[f"{resource['resourceType']}:no_patient"] += 1

    def resources(self) -> Iterator[JsonObject]:
        """Every resource of a read type in the source, references normalised."""
        yield from self._walk(self.path)

    # --- dispatch by what a path is ---------------------------------------------------------

    def _walk(self, path: Path) -> Iterator[JsonObject]:
        if path.is_dir():
            yield from self._folder(path)
        elif path.name.endswith(_TAR_SUFFIXES):
            yield from self._tar(path)
        elif path.is_file():
            with path.open("rb") as raw:
                yield from self._file(path.name, raw)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")

    def _folder(self, folder: Path) -> Iterator[JsonObject]:
        manifest = folder / "manifest.json"
        names = _manifest_files(manifest) if manifest.is_file() else None
        if names is None:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
        else:
            files = [folder / name for name in names]
        for path in files:
            if not path.is_file():
                # Listed in the manifest but never downloaded: the export is incomplete.
                self.stats.dropped["source:missing_file"] += 1
                self.stats.skipped_files.append(path.name)
            elif path.name.endswith(_TAR_SUFFIXES):
                yield from self._tar(path)
            else:
                with path.open("rb") as raw:
                    yield from self._file(path.name, raw)

    def _tar(self, path: Path) -> Iterator[JsonObject]:
        yield from self._guarded(path.name, self._tar_members(path))

    def _tar_members(self, path: Path) -> Iterator[JsonObject]:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                raw = archive.extractfile(member)
                if raw is not None:
                    yield from self._file(Path(member.name).name, raw)
            # tarfile ends as quietly at a cut inside a header as at the archive's end; only
            # the end has a second zero block after the one that stopped the loop.
            assert archive.fileobj is not None
            if len(archive.fileobj.read(tarfile.BLOCKSIZE)) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("archive cut short")

    def _guarded(self, name: str, items: Iterator[JsonObject]) -> Iterator[JsonObject]:
        """Yield from ``items``; a corrupt or truncated archive is counted, not raised.

        What was read before the damage is kept: those resources are intact.
        """
        try:
            yield from items
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            self.stats.dropped["source:corrupt_file"] += 1
            self.stats.skipped_files.append(f"{name} ({type(exc).__name__})")

    def _file(self, name: str, raw: IO[bytes]) -> Iterator[JsonObject]:
        if name in _IGNORED_NAMES:
            return
        if name.endswith(_NDJSON_SUFFIXES):
            rtype = name.split(".", 1)[0]
            self.stats.files += 1
            stream: Iterable[bytes] = gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw
            if _skipped_by_name(rtype):
                # Bulk export files are named after their type: skip unread types unparsed
                # (counting the decompressed lines, not the lines of the gzip bytes).
                yield from self._guarded(name, self._count_skipped(rtype, stream))
                return
            yield from self._guarded(name, self._ndjson(stream))
        elif name.endswith(".json"):
            self.stats.files += 1
            yield from self._json(name, raw.read())
        else:
            self.stats.skipped_files.append(name)

    def _count_skipped(self, rtype: str, stream: Iterable[bytes]) -> Iterator[JsonObject]:
        for line in stream:
            if line.strip():
                self.stats.skipped_types[rtype] += 1
        yield from ()

    def _ndjson(self, stream: Iterable[bytes]) -> Iterator[JsonObject]:
        for line in stream:
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deep to read
                self.stats.dropped["source:malformed_json"] += 1
                continue
            yield from self._accept([item])

    def _json(self, name: str, data: bytes) -> Iterator[JsonObject]:
        try:
            item = orjson.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to read
            self.stats.dropped["source:malformed_json"] += 1
            return
        if isinstance(item, dict) and item.get("resourceType") == "Bundle":
            try:
                resources = bundle_resources(item)
            except RecursionError:  # rewriting references recurses as deep as the JSON
                self.stats.dropped["source:malformed_json"] += 1
                return
            yield from self._accept(resources)
        elif isinstance(item, dict) and "resourceType" in item:
            yield from self._accept([item])
        else:
            self.stats.skipped_files.append(name)

    def _accept(self, items: Iterable[Any]) -> Iterator[JsonObject]:
        for item in items:
            rtype = item.get("resourceType") if isinstance(item, dict) else None
            if not isinstance(rtype, str):
                self.stats.dropped["source:not_a_resource"] += 1
            elif rtype not in READ_TYPES:
                self.stats.skipped_types[rtype] += 1
            else:
                yield item


def bundle_resources(bundle: JsonObject) -> list[JsonObject]:
    """A Bundle's entry resources with ``fullUrl`` references rewritten to ``Type/id``.

    Entries without an id take the uuid of their ``urn:uuid`` fullUrl, which is how
    a server would see them after a transaction assigns that id.
    """
    listed = bundle.get("entry")
    entries = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    full_urls: dict[str, str] = {}
    resources: list[JsonObject] = []
    for entry in entries:
        resource = entry.get("resource")
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        full_url = entry.get("fullUrl")
        if not isinstance(resource.get("id"), str) and isinstance(full_url, str):
            resource = {**resource, "id": full_url.rsplit(":", 1)[-1].rsplit("/", 1)[-1]}
        if isinstance(full_url, str) and isinstance(resource.get("id"), str):
            full_urls[full_url] = f"{resource['resourceType']}/{resource['id']}"
        resources.append(resource)
    if not full_urls:
        return resources
    return [rewrite_references(r, full_urls) for r in resources]


def _manifest_files(manifest: Path) -> list[str] | None:
    """Local file names of a Bulk Data manifest's outputs (URLs reduced to their last part).

    None when the manifest is unreadable: the folder is then read as a plain folder.
    """
    try:
        doc = json.loads(manifest.read_bytes())
    except (ValueError, RecursionError):  # RecursionError: nested too deep to read
        return None
    if not isinstance(doc, dict):
        return None
    names: list[str] = []
    outputs = doc.get("output")
    if not isinstance(outputs, list):
        return None
    for output in outputs:
        url = output.get("url") if isinstance(output, dict) else None
        if isinstance(url, str) and url:
            names.append(url.rstrip("/").rsplit("/", 1)[-1])
    return sorted(dict.fromkeys(names))


def _skipped_by_name(stem: str) -> bool:
    """Whether an NDJSON file's name alone says it holds nothing the adapter reads.

    A Bulk Data file is named after its resource type. A MIMIC-IV file is named after its
    profile (``MimicEncounterICU`` holds Encounters), so it is never taken for an unread type.
    """
    if stem.startswith("Mimic"):
        return stem in _MIMIC_SKIPPED
    return _is_resource_type(stem) and stem not in READ_TYPES


def _is_resource_type(name: str) -> bool:
    return name[:1].isupper() and name.isalpha()
