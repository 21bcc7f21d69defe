"""ExportReader over real files: export folders, NDJSON (plain and gzip), Bundles, tar archives.

Every test writes a tiny export under ``tmp_path`` and checks what the reader groups per
patient, what it counts, and that the records normalise the way a live fetch would.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from fhir_adapter.summary import summarize
from fhir_adapter.timeline import EventKind

JsonObject = dict[str, Any]

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

# --- resource builders -------------------------------------------------------------------


def patient(pid: str) -> JsonObject:
    """A bare Patient."""
    return {"resourceType": "Patient", "id": pid, "gender": "male"}


def encounter(eid: str, pid: str, start: str, end: str, cls: str = "IMP") -> JsonObject:
    """A finished Encounter of ``pid``."""
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": cls},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": start, "end": end},
    }


def observation(oid: str, pid: str, time: str, code: str = "2345-7") -> JsonObject:
    """A LOINC lab result of ``pid`` with no encounter reference."""
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": time,
        "valueQuantity": {"value": 5.0, "unit": "mmol/L", "code": "mmol/L"},
    }


def device(did: str, pid: str) -> JsonObject:
    """A resource type the adapter does not read."""
    return {"resourceType": "Device", "id": did, "patient": {"reference": f"Patient/{pid}"}}


def one_patient(pid: str = "p1") -> dict[str, list[JsonObject]]:
    """A minimal export for one patient: file name stem -> resources."""
    return {
        "Patient": [patient(pid)],
        "Encounter": [encounter(f"{pid}-e1", pid, "2020-03-01T00:00:00Z", "2020-03-02T00:00:00Z")],
        "Observation": [observation(f"{pid}-o1", pid, "2020-03-01T12:00:00Z")],
    }


# --- file writers ------------------------------------------------------------------------


def ndjson(resources: Iterable[JsonObject]) -> bytes:
    """NDJSON bytes, one resource per line."""
    return b"".join(json.dumps(r).encode() + b"\n" for r in resources)


def write(path: Path, data: bytes) -> Path:
    """Write ``data`` (gzip-compressed when the name ends in .gz), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def export_folder(
    folder: Path, files: dict[str, list[JsonObject]], base_url: str | None = None
) -> Path:
    """A Bulk Data export folder: ``<Type>.ndjson`` files plus a manifest listing them."""
    outputs = []
    for stem, resources in files.items():
        name = f"{stem}.ndjson"
        write(folder / name, ndjson(resources))
        url = f"{base_url}/{name}" if base_url else name
        outputs.append({"type": stem.split(".")[0], "url": url})
    manifest = {
        "transactionTime": "2020-04-01T00:00:00Z",
        "request": "https://fhir.example/$export",
        "requiresAccessToken": True,
        "output": outputs,
        "error": [],
    }
    write(folder / "manifest.json", json.dumps(manifest).encode())
    return folder


def transaction(entries: list[tuple[str, JsonObject]]) -> JsonObject:
    """A transaction Bundle of ``(fullUrl, resource)`` entries, as Synthea writes them."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": url,
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
            for url, resource in entries
        ],
    }


def make_tar(path: Path, members: dict[str, Path]) -> Path:
    """A tar archive (gzip when the name says so) of ``arcname -> file or folder``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gz = path.name.endswith((".tar.gz", ".tgz"))
    with tarfile.open(path, "w:gz") if gz else tarfile.open(path, "w") as archive:
        for arcname, source in members.items():
            archive.add(source, arcname=arcname)
    return path


def read(path: Path) -> tuple[list[PatientRecord], ExportReader]:
    """All records of ``path`` and the reader (for its stats)."""
    reader = ExportReader(path)
    return list(reader.records()), reader


def types_of(record: PatientRecord) -> Counter[str]:
    """Resource types held by a record (the Patient included)."""
    found = Counter(r["resourceType"] for r in record.resources)
    if record.patient is not None:
        found["Patient"] += 1
    return found


# --- export folders ----------------------------------------------------------------------


def test_export_folder_reads_only_files_the_manifest_lists(tmp_path: Path) -> None:
    """Manifest URLs may be absolute; only their last part names a local file, and files
    the manifest does not list (left over from an earlier export) are not read."""
    folder = export_folder(
        tmp_path / "export", one_patient(), base_url="https://fhir.example/bulk/j1"
    )
    write(folder / "Observation.old.ndjson", ndjson([observation("stale", "p1", "2020-03-01")]))
    write(folder / "notes.txt", b"not an export file")

    records, reader = read(folder)

    [record] = records
    assert types_of(record) == Counter({"Patient": 1, "Encounter": 1, "Observation": 1})
    assert reader.stats.files == 3
    assert reader.stats.skipped_files == []
    assert reader.stats.dropped == Counter()


def test_export_folder_timeline(tmp_path: Path) -> None:
    """A record read from files normalises into the expected visit and lab event."""
    records, _ = read(export_folder(tmp_path / "export", one_patient()))
    timeline = build_timeline(records[0])
    [visit] = timeline.visits
    [event] = timeline.events
    assert visit.id == "p1-e1"
    assert (event.visit_id, event.kind, event.code, event.value, event.unit) == (
        "p1-e1",
        EventKind.LAB,
        "LOINC|2345-7",
        5.0,
        "mmol/L",
    )
    assert timeline.source.source == str(tmp_path / "export")


def test_manifest_listing_a_file_that_is_not_there_counts_it(tmp_path: Path) -> None:
    """An export whose manifest lists a file never downloaded is incomplete, and says so."""
    folder = export_folder(tmp_path / "export", one_patient())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["output"].append({"type": "Condition", "url": "https://x/Condition.ndjson"})
    write(folder / "manifest.json", json.dumps(manifest).encode())

    [record], reader = read(folder)

    assert reader.stats.dropped == Counter({"source:missing_file": 1})
    assert reader.stats.skipped_files == ["Condition.ndjson"]
    assert types_of(record)["Observation"] == 1


@pytest.mark.parametrize(
    "manifest",
    [b"{not json", b"[1]", b'{"output": 5}', b'{"transactionTime": "2020"}'],
    ids=["malformed", "not_an_object", "output_not_a_list", "no_output"],
)
def test_unreadable_manifest_reads_the_folder_as_a_plain_folder(
    tmp_path: Path, manifest: bytes
) -> None:
    """A manifest that cannot be read does not hide the files next to it."""
    folder = export_folder(tmp_path / "export", one_patient())
    write(folder / "manifest.json", manifest)
    [record], reader = read(folder)
    assert types_of(record) == Counter({"Patient": 1, "Encounter": 1, "Observation": 1})
    assert reader.stats.dropped == Counter()


def test_folder_without_manifest_reads_every_file_recursively(tmp_path: Path) -> None:
    """No manifest: every file under the folder is read, subfolders included."""
    write(tmp_path / "a" / "Patient.ndjson", ndjson([patient("p1")]))
    write(
        tmp_path / "b" / "c" / "Observation.ndjson.gz",
        ndjson([observation("o1", "p1", "2020-03-01")]),
    )
    write(tmp_path / "README.md", b"# export")

    [record], reader = read(tmp_path)

    assert types_of(record) == Counter({"Patient": 1, "Observation": 1})
    assert reader.stats.files == 2
    assert reader.stats.skipped_files == ["README.md"]


# --- NDJSON files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["everything.ndjson", "everything.ndjson.gz"])
def test_single_ndjson_file_groups_resources_per_patient(tmp_path: Path, name: str) -> None:
    """One file of mixed types and patients (plain or gzip) comes out one record per
    patient, in id order, each holding only its own resources."""
    resources = [
        observation("o-b", "pb", "2020-03-01T12:00:00Z"),
        *(r for group in one_patient("pa").values() for r in group),
        patient("pb"),
    ]
    path = write(tmp_path / name, ndjson(resources))

    records, reader = read(path)

    assert [r.patient_id for r in records] == ["pa", "pb"]
    assert types_of(records[0]) == Counter({"Patient": 1, "Encounter": 1, "Observation": 1})
    assert types_of(records[1]) == Counter({"Patient": 1, "Observation": 1})
    assert all(r.source == str(path) for r in records)
    assert reader.stats.files == 1


def test_repeated_patient_resource_is_counted(tmp_path: Path) -> None:
    """Two Patient resources for one id: the later is kept and the repeat counted."""
    path = write(
        tmp_path / "Patient.ndjson", ndjson([patient("p1"), {**patient("p1"), "gender": "female"}])
    )
    [record], _ = read(path)
    assert record.patient is not None
    assert record.patient["gender"] == "female"
    assert record.dropped == Counter({"Patient:duplicate": 1})


# --- bundles -----------------------------------------------------------------------------


def synthea_bundle(pid_uuid: str = "8c95253e-8ee8-4cd5-b1ea-2ad3d3d3f0a1") -> JsonObject:
    """A transaction bundle whose entries have no ids and point at each other by urn:uuid.

    The observation lies outside its own encounter's period but inside another encounter,
    so only a correctly resolved encounter reference puts it in the right visit.
    """
    pat = f"urn:uuid:{pid_uuid}"
    enc1, enc2 = "urn:uuid:enc-0001", "urn:uuid:enc-0002"
    med = "urn:uuid:med-0001"
    return transaction(
        [
            (pat, {"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01"}),
            (
                enc1,
                {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {"code": "EMER"},
                    "subject": {"reference": pat},
                    "period": {"start": "2020-03-01T10:00:00Z", "end": "2020-03-01T11:00:00Z"},
                },
            ),
            (
                enc2,
                {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": pat},
                    "period": {"start": "2020-03-05T10:00:00Z", "end": "2020-03-05T11:00:00Z"},
                },
            ),
            (
                med,
                {
                    "resourceType": "Medication",
                    "code": {"coding": [{"system": RXNORM, "code": "314076"}]},
                },
            ),
            (
                "urn:uuid:obs-0001",
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "subject": {"reference": pat},
                    "encounter": {"reference": enc1},
                    "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
                    "effectiveDateTime": "2020-03-05T10:30:00Z",
                    "valueQuantity": {"value": 7, "unit": "mmol/L"},
                },
            ),
            (
                "urn:uuid:mr-0001",
                {
                    "resourceType": "MedicationRequest",
                    "status": "active",
                    "intent": "order",
                    "subject": {"reference": pat},
                    "encounter": {"reference": enc2},
                    "medicationReference": {"reference": med},
                    "authoredOn": "2020-03-05T10:45:00Z",
                },
            ),
            (
                "urn:uuid:cond-0001",
                {
                    "resourceType": "Condition",
                    "subject": {"reference": pat},
                    "encounter": {"reference": enc1},
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                    "onsetDateTime": "2020-03-01T10:15:00Z",
                },
            ),
        ]
    )


def test_transaction_bundle_resolves_urn_uuid_references(tmp_path: Path) -> None:
    """Entries without ids take their fullUrl uuid; every urn:uuid reference becomes
    ``Type/id`` so subject, encounter and medication references all resolve."""
    path = write(tmp_path / "patient.json", json.dumps(synthea_bundle("pat-1")).encode())

    [record], reader = read(path)
    assert record.patient_id == "pat-1"
    assert all(r["subject"] == {"reference": "Patient/pat-1"} for r in record.resources)
    assert "Medication/med-0001" in record.medications

    timeline = build_timeline(record)
    assert [(v.id, v.visit_class.value) for v in timeline.visits] == [
        ("enc-0001", "emergency"),
        ("enc-0002", "ambulatory"),
    ]
    lab, medication = timeline.events
    # Attached by its (resolved) encounter reference, not by time; clamped into that visit.
    assert (lab.kind, lab.visit_id, lab.time) == (
        EventKind.LAB,
        "enc-0001",
        datetime(2020, 3, 1, 11, tzinfo=UTC),
    )
    assert (medication.code, medication.visit_id) == ("RXNORM|314076", "enc-0002")
    [label] = timeline.conditions
    assert (label.code, label.visit_id) == ("SNOMED|44054006", "enc-0001")
    assert timeline.source.dropped == Counter()
    assert reader.stats.dropped == Counter()


def test_bundle_with_server_ids_and_absolute_full_urls(tmp_path: Path) -> None:
    """A searchset with ids and absolute fullUrls is read as is."""
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": f"https://fhir.example/r4/{r['resourceType']}/{r['id']}", "resource": r}
            for group in one_patient("p7").values()
            for r in group
        ],
    }
    [record], _ = read(write(tmp_path / "search.json", json.dumps(bundle).encode()))
    assert record.patient_id == "p7"
    assert len(build_timeline(record).events) == 1


def test_single_resource_json_file(tmp_path: Path) -> None:
    """A .json file holding one resource (not a Bundle) is read as that resource."""
    write(tmp_path / "pat.json", json.dumps(patient("p1")).encode())
    [record], _ = read(tmp_path)
    assert record.patient == patient("p1")


# --- tar archives ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["export.tar.gz", "export.tgz", "export.tar"])
def test_tar_of_an_export_folder(tmp_path: Path, name: str) -> None:
    """An export folder archived as a (gzip) tar reads like the folder itself."""
    files = {**one_patient("p1"), "Device": [device("d1", "p1")]}
    folder = export_folder(tmp_path / "export", files)
    archive = make_tar(tmp_path / name, {"export": folder})

    from_tar = read(archive)
    from_folder = read(folder)

    assert [r.resources for r in from_tar[0]] == [r.resources for r in from_folder[0]]
    assert from_tar[1].stats.skipped_types == Counter({"Device": 1})
    assert from_tar[1].stats.files == 4


def test_tar_of_bundle_files(tmp_path: Path) -> None:
    """A plain tar of several patients' bundles: one record per patient, references resolved."""
    first = write(tmp_path / "b1.json", json.dumps(synthea_bundle("pat-1")).encode())
    second = write(tmp_path / "b2.json", json.dumps(synthea_bundle("pat-2")).encode())
    archive = make_tar(tmp_path / "bundles.tar", {"out/b1.json": first, "out/b2.json": second})

    records, reader = read(archive)

    assert [r.patient_id for r in records] == ["pat-1", "pat-2"]
    for record in records:
        assert len(build_timeline(record).events) == 2
    assert reader.stats.files == 2


def test_tar_inside_an_export_folder(tmp_path: Path) -> None:
    """A folder may hold archives; they are opened like any other file."""
    src = export_folder(tmp_path / "src", one_patient("p1"))
    make_tar(tmp_path / "data" / "part1.tar.gz", {"src": src})
    [record], _ = read(tmp_path / "data")
    assert types_of(record)["Observation"] == 1


# --- what is skipped, what is resolved ----------------------------------------------------


def test_unread_types_are_skipped_not_dropped(tmp_path: Path) -> None:
    """Devices, practitioners and the like are counted in skipped_types, never as drops,
    whether they come as a typed NDJSON file (plain or gzip), a mixed file or a bundle."""
    folder = tmp_path / "export"
    for stem, resources in one_patient("p1").items():
        write(folder / f"{stem}.ndjson", ndjson(resources))
    write(folder / "Device.ndjson", ndjson([device("d1", "p1"), device("d2", "p1")]))
    write(folder / "Device.001.ndjson.gz", ndjson([device(f"g{i}", "p1") for i in range(3)]))
    write(folder / "mixed.ndjson", ndjson([{"resourceType": "Organization", "id": "org"}]))
    bundle = transaction(
        [
            ("urn:uuid:pr1", {"resourceType": "Practitioner"}),
            ("urn:uuid:pr2", {"resourceType": "Practitioner"}),
        ]
    )
    write(folder / "practitioners.json", json.dumps(bundle).encode())

    summary = summarize(folder)

    assert summary.skipped_types == Counter({"Device": 5, "Organization": 1, "Practitioner": 2})
    assert summary.dropped == Counter()
    assert summary.patients == 1
    assert summary.events == Counter({"lab": 1})


def test_medication_resolved_across_files(tmp_path: Path) -> None:
    """A Medication in a file read after the MedicationRequest still resolves its reference."""
    write(tmp_path / "a" / "Patient.ndjson", ndjson([patient("p1")]))
    write(
        tmp_path / "a" / "Encounter.ndjson",
        ndjson([encounter("e1", "p1", "2020-03-01T00:00:00Z", "2020-03-02T00:00:00Z")]),
    )
    request = {
        "resourceType": "MedicationRequest",
        "id": "mr1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "medicationReference": {"reference": "https://fhir.example/r4/Medication/m1/_history/2"},
        "authoredOn": "2020-03-01T08:00:00Z",
    }
    write(tmp_path / "a" / "MedicationRequest.ndjson", ndjson([request]))
    medication = {
        "resourceType": "Medication",
        "id": "m1",
        "code": {"coding": [{"system": RXNORM, "code": "197361"}]},
    }
    write(tmp_path / "z" / "Medication.ndjson", ndjson([medication]))

    [record], reader = read(tmp_path)

    assert record.medications == {"Medication/m1": medication}
    assert all(r["resourceType"] != "Medication" for r in record.resources)
    [event] = build_timeline(record).events
    assert (event.kind, event.code, event.visit_id) == (EventKind.MEDICATION, "RXNORM|197361", "e1")
    assert reader.stats.skipped_types == Counter()


def test_summarize_counts_an_export(tmp_path: Path) -> None:
    """summarize() reports patients, visits by class, events by kind and files."""
    files = one_patient("p1")
    files["Patient"].append(patient("p2"))
    files["Encounter"].append(encounter("p2-e1", "p2", "2021-01-01", "2021-01-02", cls="AMB"))
    summary = summarize(export_folder(tmp_path / "export", files))
    report = summary.to_json()
    assert report["patients"] == 2
    assert report["visits"] == {"ambulatory": 1, "inpatient": 1}
    assert report["events"] == {"lab": 1}
    assert report["resources"] == {"Encounter": 2, "Observation": 1, "Patient": 2}
    assert report["files"] == 3
    assert report["dropped"] == {}


def test_missing_path_raises(tmp_path: Path) -> None:
    """A source that does not exist is an operator error, reported at once."""
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "nowhere")
