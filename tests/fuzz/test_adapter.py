"""Fuzzed resources, Bundles and export files through the FHIR adapter.

The adapter's contract (fhir_adapter/normalize.py, fhir_adapter/files.py): anything
unusable is counted under ``dropped`` (or ``skipped_types``), nothing raises but the
documented errors (``build_timeline``: ValueError for a record without a Patient; the file
readers: FileNotFoundError for a path that is not there), and nothing hangs. These
properties check all three over every resource type the adapter reads, with wrong JSON
types, absurd numbers, NaN-like and unicode-heavy strings and deep nests in every field
(``tests/fhir_adapter/test_hostile_input.py`` covers Observations field by field).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fhir_adapter.files import ExportReader, bundle_resources
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import READ_TYPES, PatientRecord
from fhir_adapter.references import patient_id_of
from tests.fuzz.bounded import within
from tests.fuzz.strategies import (
    Json,
    JsonObject,
    clinical_resources,
    hostile,
    json_values,
    maybe,
    resources,
)

BOUND_S = 10.0  # per example; a normal one takes milliseconds
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- build_timeline ----------------------------------------------------------------------

any_resource = st.one_of(
    clinical_resources(), resources("Medication"), resources("Patient"), hostile
).filter(lambda r: isinstance(r, dict))


@FUZZ
@given(
    patient=resources("Patient", patient_id=maybe(st.just("p1"))),
    items=st.lists(any_resource, max_size=8),
)
def test_any_record_becomes_a_timeline_with_every_resource_accounted_for(
    patient: JsonObject, items: list[JsonObject]
) -> None:
    """Each resource ends as a visit's encounter, events, a condition, or counted drops:
    exactly one of these, except that a panel may give several events."""
    with within(BOUND_S):
        timeline = build_timeline(PatientRecord("p1", patient, items, "fuzz"))
    accounted = (
        sum(len(v.encounter_ids) for v in timeline.visits)
        + len(timeline.events)
        + len(timeline.conditions)
        + sum(timeline.source.dropped.values())
    )
    if any("component" in r for r in items):
        assert accounted >= len(items)
    else:
        assert accounted == len(items), timeline.source.dropped
    visits = {v.id: v for v in timeline.visits}
    for event in timeline.events:
        visit = visits[event.visit_id]
        assert visit.start <= event.time
        assert visit.end is None or event.time <= visit.end
        assert event.value is None or math.isfinite(event.value)
        assert event.unit is None or event.unit.isprintable()
    assert [e.time for e in timeline.events] == sorted(e.time for e in timeline.events)


def test_a_record_without_a_patient_is_the_documented_value_error() -> None:
    with pytest.raises(ValueError, match="no Patient resource"):
        build_timeline(PatientRecord("p1", None, [], "fuzz"))


# --- Bundles -----------------------------------------------------------------------------

entries = st.one_of(
    hostile,
    st.fixed_dictionaries(
        {},
        optional={
            "fullUrl": maybe(st.sampled_from(["urn:uuid:e1", "urn:uuid:p1", "Encounter/e2"])),
            "resource": maybe(st.one_of(clinical_resources(), resources("Patient"))),
        },
    ),
)


def _holds_resource(entry: Json) -> bool:
    resource = entry.get("resource") if isinstance(entry, dict) else None
    return isinstance(resource, dict) and isinstance(resource.get("resourceType"), str)


@FUZZ
@given(listed=maybe(st.lists(entries, max_size=6)))
def test_bundle_entries_are_resources_or_left_out(listed: Json) -> None:
    """Every entry holding a resource comes out as one; junk entries are not resources."""
    with within(BOUND_S):
        out = bundle_resources({"resourceType": "Bundle", "type": "transaction", "entry": listed})
    expected = sum(map(_holds_resource, listed)) if isinstance(listed, list) else 0
    assert len(out) == expected
    assert all(isinstance(r["resourceType"], str) for r in out)


# --- export files ------------------------------------------------------------------------

# Lines as an export may hold them: resources of three patients (one never exported), other
# resource types, JSON that is no resource, bytes that are no JSON, and nests around and
# beyond what orjson reads and writes.
line_items: st.SearchStrategy[Json] = st.one_of(
    clinical_resources(patient_id=st.sampled_from(["p1", "p2", "ghost"])),
    resources("Patient", patient_id=maybe(st.sampled_from(["p1", "p2"]))),
    resources("Medication"),
    st.fixed_dictionaries({"resourceType": st.sampled_from(["Bundle", "Device", "Basic"])}),
    json_values,
)


def _deep_line(depth: int) -> bytes:
    head = b'{"resourceType": "Observation", "subject": {"reference": "Patient/p1"}, "x": '
    return head + b"[" * depth + b"]" * depth + b"}"


raw_lines = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"1e999", b"NaN", b"-"]),
    st.sampled_from([300, 1_100, 20_000]).map(_deep_line),
)
files = st.lists(st.one_of(line_items, raw_lines), max_size=12)
NAMES = ["Observation.ndjson", "Encounter.ndjson.gz", "Device.ndjson", "MimicCondition.ndjson"]


def _line(item: Json) -> bytes:
    return item if isinstance(item, bytes) else json.dumps(item).encode()


def _with_unique_medication_ids(items: list[Json]) -> list[Json]:
    """Medications keyed by id replace each other; unique ids make every line countable."""
    for n, item in enumerate(items):
        medication = isinstance(item, dict) and item.get("resourceType") == "Medication"
        if medication and isinstance(item.get("id"), str):
            item["id"] = f"m{n}"
    return items


def _export(folder: Path, contents: list[list[Json]]) -> int:
    """Write ``contents`` as NDJSON files beside a valid Patient; returns the non-blank
    lines written (what the reader must account for)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Patient.ndjson").write_bytes(b'{"resourceType": "Patient", "id": "p0"}\n')
    lines = 1
    for name, items in zip(NAMES, contents, strict=False):
        body = b"\n".join(_line(i) for i in _with_unique_medication_ids(items)) + b"\n"
        lines += sum(1 for part in body.split(b"\n") if part.strip())
        (folder / name).write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    return lines


def _tar(folder: Path, cut: float | None) -> Path:
    """The export as one .tar.gz, cut to ``cut`` of its size when given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, arcname=f"export/{path.name}")
    data = buffer.getvalue()
    target = folder.parent / "export.tar.gz"
    target.write_bytes(data if cut is None else data[: int(len(data) * cut)])
    return target


def _read(path: Path) -> tuple[ExportReader, list[PatientRecord]]:
    reader = ExportReader(path)
    with within(BOUND_S):
        records = list(reader.records())
    for record in records:
        assert record.patient is not None
        for resource in [record.patient, *record.resources]:
            assert resource["resourceType"] in READ_TYPES
            assert patient_id_of(resource) == record.patient_id
    return reader, records


def _accounted(reader: ExportReader, records: list[PatientRecord]) -> int:
    medications = records[0].medications if records else {}
    return (
        sum(reader.stats.dropped.values())
        + sum(reader.stats.skipped_types.values())
        + sum(1 + len(r.resources) + r.dropped.total() for r in records)
        + len(medications)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    contents=st.lists(files, min_size=1, max_size=len(NAMES)),
    cut=st.sampled_from([None, 0.3, 0.5, 0.8, 0.95]),
)
# Found by CI: the same Medication in two files was kept once and counted nowhere.
@example(contents=[[{"resourceType": "Medication", "id": "m0"}]] * 2, cut=None)
def test_every_exported_line_is_a_resource_or_counted(
    contents: list[list[Json]], cut: float | None
) -> None:
    """Folder or tar archive, each non-blank line lands in exactly one record, the
    medication table or a counter; a tar cut short is counted as corrupt (never raised),
    or else has lost nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        lines = _export(folder, contents)
        reader, records = _read(folder)
        assert _accounted(reader, records) == lines, (reader.stats, records)
        assert any(r.patient_id == "p0" for r in records)

        in_tar, tar_records = _read(_tar(folder, cut))
        corrupt = in_tar.stats.dropped["source:corrupt_file"]  # the tar, a gzip member in it
        if cut is None or not corrupt:
            assert _accounted(in_tar, tar_records) == lines  # nothing lost unreported
        else:
            assert _accounted(in_tar, tar_records) - corrupt <= lines


bundle_files = maybe(
    st.fixed_dictionaries(
        {"resourceType": st.just("Bundle"), "entry": maybe(st.lists(entries, max_size=5))}
    )
)
listed_urls = maybe(st.sampled_from(["x/Observation.ndjson", "../../etc/passwd", "..", ""]))
manifests = st.one_of(
    st.none(),
    hostile,
    st.fixed_dictionaries(
        {"output": maybe(st.lists(st.fixed_dictionaries({"url": listed_urls}), max_size=3))}
    ),
)


@FUZZ
@given(bundle=bundle_files, manifest=manifests)
def test_bundle_files_and_manifests_never_raise(bundle: Json, manifest: Json) -> None:
    """A .json file of any shape is read as a Bundle or a resource, or counted as a bad
    file; a manifest of any shape is followed or ignored; neither raises."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "Patient.ndjson").write_bytes(b'{"resourceType": "Patient", "id": "p1"}\n')
        (folder / "bundle.json").write_text(json.dumps(bundle))
        if manifest is not None:
            (folder / "manifest.json").write_text(json.dumps(manifest))
        _read(folder)


def test_a_manifest_nested_too_deep_reads_the_folder_plainly(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (tmp_path / "Patient.ndjson").write_bytes(b'{"resourceType": "Patient", "id": "p1"}\n')
    _, records = _read(tmp_path)
    assert [r.patient_id for r in records] == ["p1"]


def test_lines_nested_between_what_orjson_writes_and_reads_are_counted(tmp_path: Path) -> None:
    """orjson reads 1,023 levels but writes only 254: such a line is counted, not raised."""
    (tmp_path / "Patient.ndjson").write_bytes(b'{"resourceType": "Patient", "id": "p1"}\n')
    (tmp_path / "Observation.ndjson").write_bytes(_deep_line(600) + b"\n")
    reader, records = _read(tmp_path)
    assert reader.stats.dropped["source:malformed_json"] == 1
    assert [r.patient_id for r in records] == ["p1"]
