"""Hostile and broken input: nothing raises, and every unusable resource is counted by reason.

DESIGN.md 3.1: a resource that cannot be used is counted under ``dropped``, never raises.
File-level cases go through ``summarize`` (reader + normaliser, as ``data inspect`` runs);
resource-level cases go straight to ``build_timeline``. A hypothesis property closes the
gaps hand-picked cases leave.
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_adapter.files import ExportReader
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from fhir_adapter.summary import SourceSummary, summarize
from fhir_adapter.timeline import Timeline

JsonObject = dict[str, Any]

LOINC = "http://loinc.org"
INSIDE = "2020-03-01T12:00:00Z"  # within encounter e1
OUTSIDE = "2020-06-01T12:00:00Z"

# --- builders ----------------------------------------------------------------------------


def patient(pid: str = "p1") -> JsonObject:
    """A bare Patient."""
    return {"resourceType": "Patient", "id": pid}


def encounter(pid: str = "p1") -> JsonObject:
    """Encounter e1 of ``pid`` covering 1-2 March 2020."""
    return {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "IMP"},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": "2020-03-01T00:00:00Z", "end": "2020-03-02T00:00:00Z"},
    }


def observation(oid: str = "o1", pid: str = "p1", **fields: Any) -> JsonObject:
    """A valid lab result inside e1; ``fields`` override or add fields (None removes one)."""
    resource: JsonObject = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
        "effectiveDateTime": INSIDE,
        "valueQuantity": {"value": 5.4, "unit": "mmol/L", "code": "mmol/L"},
    }
    resource.update(fields)
    return {k: v for k, v in resource.items() if v is not None}


def line(resource: Any) -> bytes:
    """One NDJSON line."""
    return json.dumps(resource).encode() + b"\n"


def export(folder: Path, observation_file: bytes, name: str = "Observation.ndjson") -> Path:
    """An export folder with patient p1, encounter e1 and ``observation_file`` as ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Patient.ndjson").write_bytes(line(patient()))
    (folder / "Encounter.ndjson").write_bytes(line(encounter()))
    (folder / name).write_bytes(observation_file)
    return folder


def summarize_observations(tmp_path: Path, *lines: bytes) -> SourceSummary:
    """summarize() over the base export plus an Observation file of ``lines``."""
    return summarize(export(tmp_path / "export", b"".join(lines)))


def build(*resources: JsonObject, the_patient: JsonObject | None = None) -> Timeline:
    """p1's timeline from encounter e1 plus ``resources``."""
    record = PatientRecord("p1", the_patient or patient(), [encounter(), *resources], "test")
    return build_timeline(record)


# --- broken files and lines --------------------------------------------------------------


def test_malformed_json_lines_are_counted_and_the_rest_is_read(tmp_path: Path) -> None:
    """A truncated or garbled line costs that line only."""
    summary = summarize_observations(
        tmp_path,
        b'{"resourceType": "Observation", "id": "cut\n',
        b"not json at all\n",
        b'{"a": 1}}\n',
        b"{'single': 'quotes'}\n",
        line(observation()),
    )
    assert summary.dropped == Counter({"source:malformed_json": 4})
    assert summary.events == Counter({"lab": 1})


def test_json_that_is_not_a_resource_is_counted(tmp_path: Path) -> None:
    """Valid JSON without a string resourceType is not a resource."""
    junk = [b"[1, 2]", b'"x"', b"{}", b"42", b"null", b"true", b'{"resourceType": 5}']
    summary = summarize_observations(tmp_path, *(j + b"\n" for j in junk))
    assert summary.dropped == Counter({"source:not_a_resource": 7})
    assert summary.patients == 1


def test_invalid_utf8_is_malformed_json(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (stray binary, Latin-1 text) are malformed lines."""
    latin1 = json.dumps(observation("o2", code={"text": "café"}), ensure_ascii=False)
    summary = summarize_observations(
        tmp_path,
        b"\xff\xfe\x00\x01garbage\n",
        b'{"resourceType": "Observation", "id": "\xc3\x28"}\n',
        latin1.encode("latin-1") + b"\n",
        line(observation()),
    )
    assert summary.dropped == Counter({"source:malformed_json": 3})
    assert summary.events == Counter({"lab": 1})


def test_invalid_utf8_bundle_file_is_malformed_json(tmp_path: Path) -> None:
    """A whole .json file that does not decode is one malformed source, not a crash."""
    folder = export(tmp_path / "export", b"")
    (folder / "bundle.json").write_bytes(b'{"resourceType": "Bundle", "entry": [\xff]}')
    assert summarize(folder).dropped == Counter({"source:malformed_json": 1})


@pytest.mark.parametrize(
    "entry",
    [5, "entries", {"resource": {"resourceType": "Patient"}}, [5, None, {"resource": 7}]],
    ids=["int", "string", "object", "junk_items"],
)
def test_bundle_with_junk_entries_reads_as_empty(tmp_path: Path, entry: Any) -> None:
    """A Bundle whose ``entry`` is not a list of entries holds nothing usable."""
    folder = export(tmp_path / "export", b"")
    (folder / "bundle.json").write_text(json.dumps({"resourceType": "Bundle", "entry": entry}))
    summary = summarize(folder)
    assert (summary.patients, summary.dropped, summary.skipped_types) == (1, Counter(), Counter())


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_deeply_nested_json_is_malformed_not_a_crash(tmp_path: Path, depth: int) -> None:
    """JSON nested beyond the decoder's recursion limit is counted, in NDJSON and bundles."""
    nested = b'{"resourceType": "Observation", "x": ' + b"[" * depth + b"]" * depth + b"}\n"
    folder = export(tmp_path / "export", nested + line(observation()))
    (folder / "bundle.json").write_bytes(nested)
    summary = summarize(folder)
    assert summary.dropped == Counter({"source:malformed_json": 2})
    assert summary.events == Counter({"lab": 1})


def test_bundle_nested_deep_enough_to_break_reference_rewriting(tmp_path: Path) -> None:
    """A bundle the decoder accepts but reference rewriting cannot walk is counted."""
    depth = 600  # json.loads accepts it; recursive reference rewriting does not
    deep: Any = "leaf"
    for _ in range(depth):
        deep = [deep]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"fullUrl": "urn:uuid:o9", "resource": {**observation("o9"), "x": deep}}],
    }
    folder = export(tmp_path / "export", b"")
    (folder / "bundle.json").write_text(json.dumps(bundle))
    summary = summarize(folder)  # must not raise, whichever way the depth falls
    assert sum(summary.events.values()) + summary.dropped["source:malformed_json"] == 1


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("Observation.ndjson", b""),
        ("Observation.ndjson", b"\n\n   \n"),
        ("Observation.ndjson.gz", gzip.compress(b"")),
        ("empty.json", b""),
    ],
)
def test_empty_files_read_as_nothing(tmp_path: Path, name: str, data: bytes) -> None:
    """An empty (or blank, or empty gzip) NDJSON file holds nothing and drops nothing;
    an empty .json file is one malformed source."""
    summary = summarize(export(tmp_path / "export", data, name=name))
    expected = Counter({"source:malformed_json": 1}) if name.endswith(".json") else Counter()
    assert summary.dropped == expected
    assert summary.patients == 1
    assert summary.events == Counter()


def test_empty_file_alone(tmp_path: Path) -> None:
    """A source with no resources at all summarises to zero patients."""
    path = tmp_path / "Observation.ndjson"
    path.write_bytes(b"")
    summary = summarize(path)
    assert (summary.patients, summary.dropped, summary.files) == (0, Counter(), 1)


# --- unusable resources, counted by exact reason ------------------------------------------


@pytest.mark.parametrize(
    ("resource", "reason"),
    [
        pytest.param(observation(code=None), "Observation:no_code", id="no_code"),
        pytest.param(observation(code={"text": "glucose"}), "Observation:no_code", id="text_only"),
        pytest.param(observation(effectiveDateTime=None), "Observation:no_time", id="no_date"),
        pytest.param(
            observation(effectiveDateTime="last tuesday"),
            "Observation:unparsable_date",
            id="unparsable_date",
        ),
        pytest.param(
            observation(effectiveDateTime=OUTSIDE), "Observation:outside_visit", id="outside"
        ),
        pytest.param(
            observation(valueQuantity={"value": "5.4"}), "Observation:bad_value", id="bad_value"
        ),
        pytest.param(
            observation(valueQuantity={"value": 1, "code": ""}), "Observation:bad_unit", id="unit"
        ),
        pytest.param(
            observation(category=[{"coding": [{"code": "social-history"}]}]),
            "Observation:category",
            id="category",
        ),
    ],
)
def test_unusable_observation_is_counted_by_reason(
    tmp_path: Path, resource: JsonObject, reason: str
) -> None:
    """Each unusable resource adds exactly one count under its own reason."""
    summary = summarize_observations(tmp_path, line(resource), line(observation("ok")))
    assert summary.dropped == Counter({reason: 1})
    assert summary.events == Counter({"lab": 1})


def test_unknown_code_system_is_kept_under_an_other_name(tmp_path: Path) -> None:
    """A local code system is still a concept; it gets a stable OTHER: name, not a drop."""
    local = {"coding": [{"system": "urn:hospital:lab", "code": "GLU"}]}
    path = export(tmp_path / "export", line(observation(code=local)))
    [record] = ExportReader(path).records()
    timeline = build_timeline(record)
    [event] = timeline.events
    assert event.code.startswith("OTHER:")
    assert event.code.endswith("|GLU")
    assert timeline.source.dropped == Counter()


def test_value_without_unit_is_kept(tmp_path: Path) -> None:
    """A number with no unit is a value with unit None, not a drop."""
    path = export(tmp_path / "export", line(observation(valueQuantity={"value": 3})))
    [record] = ExportReader(path).records()
    [event] = build_timeline(record).events
    assert (event.value, event.unit) == (3.0, None)


def test_duplicate_resources_are_counted_once_each(tmp_path: Path) -> None:
    """The same resource exported twice is one event and one duplicate."""
    summary = summarize_observations(
        tmp_path, line(observation()), line(observation()), line(observation())
    )
    assert summary.dropped == Counter({"Observation:duplicate": 2})
    assert summary.events == Counter({"lab": 1})


def test_resources_of_a_missing_patient_are_no_patient(tmp_path: Path) -> None:
    """Resources for a patient whose Patient resource is absent are counted per type."""
    folder = export(tmp_path / "export", line(observation("o2", pid="ghost")) + line(observation()))
    (folder / "Encounter.ndjson").write_bytes(line(encounter()) + line(encounter("ghost")))
    summary = summarize(folder)
    assert summary.dropped == Counter({"Observation:no_patient": 1, "Encounter:no_patient": 1})
    assert summary.patients == 1


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(None, id="absent"),
        pytest.param("Patient/p1", id="string_not_reference"),
        pytest.param({"reference": "Group/g1"}, id="not_a_patient"),
        pytest.param({"reference": ""}, id="empty"),
        pytest.param({"reference": "#p1"}, id="contained"),
        pytest.param({"display": "John"}, id="display_only"),
    ],
)
def test_resources_without_a_patient_subject_are_no_subject(tmp_path: Path, subject: Any) -> None:
    """Without a Patient reference no record can own the resource."""
    summary = summarize_observations(tmp_path, line(observation("o2", subject=subject)))
    assert summary.dropped == Counter({"Observation:no_subject": 1})


# --- hostile field values straight into the normaliser ------------------------------------


@pytest.mark.parametrize(
    ("resource", "dropped"),
    [
        pytest.param(observation(status=[]), {}, id="status_list"),
        pytest.param(observation(status={"x": 1}), {}, id="status_object"),
        pytest.param(observation(id=[1]), {}, id="id_list"),
        pytest.param(observation(category="laboratory"), {}, id="category_not_list"),
        pytest.param(observation(category=[{"coding": 5}]), {"category": 1}, id="coding_int"),
        pytest.param(
            observation(category=[{"coding": [{"code": []}]}]), {"category": 1}, id="code_list"
        ),
        pytest.param(observation(component=5), {}, id="component_int"),
        pytest.param(observation(valueQuantity=None, component=[5, "x"]), {}, id="components"),
        pytest.param(
            observation(valueQuantity={"value": 10**400}), {"bad_value": 1}, id="int_beyond_float"
        ),
        pytest.param(
            observation(code={"coding": [{"system": "\ud800", "code": "1"}]}),
            {},
            id="surrogate_system",
        ),
        pytest.param(
            observation(code={"coding": {"system": LOINC, "code": "1"}}),
            {"no_code": 1},
            id="coding_object",
        ),
        pytest.param(
            observation(effectiveDateTime="0001-01-01T00:00:00+05:00"),
            {"unparsable_date": 1},
            id="offset_before_year_1",
        ),
        pytest.param(
            observation(effectiveDateTime="9999-12-31T23:00:00-05:00"),
            {"unparsable_date": 1},
            id="offset_after_year_9999",
        ),
        pytest.param(observation(meta={"lastUpdated": "0001-01-01T00:00+01:00"}), {}, id="meta"),
        pytest.param(observation(meta="yesterday"), {}, id="meta_string"),
        pytest.param(observation(encounter="Encounter/e1"), {}, id="encounter_string"),
        pytest.param(observation(encounter={"reference": ["e1"]}), {}, id="encounter_list"),
        pytest.param(
            observation(effectivePeriod="2020", effectiveDateTime=None),
            {"no_time": 1},
            id="period_string",
        ),
    ],
)
def test_hostile_observation_fields(resource: JsonObject, dropped: dict[str, int]) -> None:
    """Wrong JSON types in any field give a usable event or one counted drop, never a crash."""
    timeline = build(resource)
    assert timeline.source.dropped == Counter({f"Observation:{k}": v for k, v in dropped.items()})
    assert len(timeline.events) == (0 if dropped else 1)


def test_hostile_fields_in_other_resource_types() -> None:
    """Conditions, medications, encounters and the patient survive wrong JSON types too."""
    resources: list[JsonObject] = [
        {
            "resourceType": "Condition",
            "id": "c1",
            "verificationStatus": "confirmed",
            "code": {"coding": [{"code": "x"}]},
            "onsetDateTime": INSIDE,
        },
        {
            "resourceType": "Condition",
            "id": "c2",
            "verificationStatus": {"coding": "refuted"},
            "code": {"coding": [{"code": "y"}]},
            "onsetDateTime": INSIDE,
        },
        {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "medicationReference": {"reference": "#med"},
            "contained": 5,
            "authoredOn": INSIDE,
        },
        {"resourceType": "Encounter", "id": "e2", "status": {}, "period": {"start": "2021"}},
        {"resourceType": "Encounter", "id": "e3", "class": 7, "period": "2021"},
        {"resourceType": "Procedure", "id": "pr1", "status": ["done"], "code": 5},
    ]
    hostile_patient = {
        "resourceType": "Patient",
        "id": "p1",
        "birthDate": "1950-02-30",
        "gender": 1,
        "deceasedDateTime": "9999-12-31T23:00:00-05:00",
    }
    timeline = build(*resources, the_patient=hostile_patient)
    assert [c.code.split("|")[1] for c in timeline.conditions] == ["x", "y"]
    assert [v.id for v in timeline.visits] == ["e1", "e2"]
    assert timeline.source.dropped == Counter(
        {"MedicationRequest:no_code": 1, "Encounter:no_time": 1, "Procedure:no_code": 1}
    )
    patient_ = timeline.patient
    assert (patient_.birth_date, patient_.sex, patient_.deceased) == (None, None, False)


# --- scale -------------------------------------------------------------------------------


def test_fifty_thousand_observations_for_one_patient(tmp_path: Path) -> None:
    """A very long record is read and counted in full: no silent cap, no crash."""
    count = 50_000
    template = (
        '{"resourceType":"Observation","id":"o%d","status":"final",'
        '"subject":{"reference":"Patient/p1"},"encounter":{"reference":"Encounter/e1"},'
        '"code":{"coding":[{"system":"http://loinc.org","code":"%d-0"}]},'
        '"effectiveDateTime":"2020-03-01T%02d:%02d:%02dZ",'
        '"valueQuantity":{"value":%d,"unit":"mg/dL","code":"mg/dL"}}\n'
    )
    body = "".join(
        template % (i, i % 50, (i // 3600) % 24, (i // 60) % 60, i % 60, i % 300)
        for i in range(count)
    )
    folder = export(tmp_path / "export", body.encode())

    summary = summarize(folder)  # ~2 s here; timings belong in bench/, not in asserts

    assert summary.resources["Observation"] == count
    assert summary.events == Counter({"lab": count})
    assert summary.dropped == Counter()
    assert summary.patients == 1


# --- property: garbage never raises, and every resource is accounted for -------------------

KNOWN_SYSTEMS = [LOINC, "http://snomed.info/sct", "urn:oid:2.16.840.1.113883.6.1", "", "\ud800"]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: includes ints beyond the float range
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
date_like = st.one_of(
    st.sampled_from(
        [
            "2020",
            "2020-03",
            "2020-02-30",
            "2020-03-01T12:00:00Z",
            "2020-03-01T12:00:00",
            "2020-03-01T12:00:00+14:00",
            "0001-01-01T00:00:00+05:00",
            "9999-12-31T23:59:59-05:00",
            "2020-03-01T24:00:00Z",
            "not a date",
            "",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat()),
    json_value,
)
coding = st.fixed_dictionaries(
    {},
    optional={
        "system": st.one_of(st.sampled_from(KNOWN_SYSTEMS), json_value),
        "code": st.one_of(st.text(max_size=8), json_value),
    },
)
codeable = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {}, optional={"coding": st.one_of(st.lists(coding, max_size=3), json_value)}
    ),
)
quantity = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {},
        optional={
            "value": st.one_of(st.integers(), st.floats(), json_value),
            "unit": st.one_of(st.text(max_size=70), json_value),
            "code": st.one_of(st.sampled_from(["mg/dL", "", " ", "a\x00b"]), json_value),
        },
    ),
)
reference = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {
            "reference": st.one_of(
                st.sampled_from(["Encounter/e1", "Encounter/zz", "urn:uuid:e1", "#e1", "", "/"]),
                json_value,
            )
        }
    ),
)
category_field = st.one_of(
    json_value,
    st.lists(
        st.one_of(codeable, st.just({"coding": [{"code": "laboratory"}]})),
        max_size=2,
    ),
)
observation_fields: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(st.just("o1"), json_value),
    "status": st.one_of(st.sampled_from(["final", "entered-in-error", "registered"]), json_value),
    "category": category_field,
    "code": codeable,
    "valueQuantity": quantity,
    "valueString": json_value,
    "effectiveDateTime": date_like,
    "effectiveInstant": date_like,
    "effectivePeriod": st.one_of(json_value, st.fixed_dictionaries({"start": date_like})),
    "issued": date_like,
    "encounter": reference,
    "meta": st.one_of(json_value, st.fixed_dictionaries({"lastUpdated": date_like})),
}
base = {"resourceType": st.just("Observation"), "subject": st.just({"reference": "Patient/p1"})}
garbage_observation = st.fixed_dictionaries(
    base, optional={**observation_fields, **{"junk": json_value}}
)
component = st.fixed_dictionaries({}, optional={"code": codeable, "valueQuantity": quantity})
garbage_panel = st.fixed_dictionaries(
    base,
    optional={
        **observation_fields,
        "component": st.one_of(json_value, st.lists(st.one_of(component, json_value), max_size=3)),
    },
)


def open_visit_timeline(resource: JsonObject) -> Timeline:
    """p1's timeline with ``resource`` and one ongoing visit that starts in 1900."""
    ongoing = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "in-progress",
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "1900-01-01T00:00:00Z"},
    }
    record = PatientRecord("p1", patient(), [ongoing, resource], "test")
    return build_timeline(record)


@settings(max_examples=400, deadline=None)
@given(garbage_observation)
def test_garbage_observation_is_an_event_or_one_drop(resource: JsonObject) -> None:
    """Without components, each Observation ends as exactly one event or one counted drop."""
    json.dumps(resource)  # the input is JSON-serialisable (NaN and Infinity allowed)
    timeline = open_visit_timeline(resource)
    assert len(timeline.events) + sum(timeline.source.dropped.values()) == 1
    for event in timeline.events:
        assert event.visit_id == "e1"
        assert event.value is None or math.isfinite(event.value)
        assert "|" in event.code


@settings(max_examples=300, deadline=None)
@given(garbage_panel)
def test_garbage_panel_is_used_whole_or_dropped_whole(resource: JsonObject) -> None:
    """A panel gives its component events with no drop, or one drop and no events."""
    timeline = open_visit_timeline(resource)
    dropped = sum(timeline.source.dropped.values())
    assert (dropped, len(timeline.events) > 0) in {(0, True), (1, False)}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=60), max_size=6))
def test_garbage_bytes_never_stop_the_reader(lines: list[bytes]) -> None:
    """Any bytes at all in an NDJSON file are read or counted; the valid line still counts."""
    with tempfile.TemporaryDirectory() as tmp:
        body = b"\n".join(lines) + b"\n" + line(observation("valid"))
        summary = summarize(export(Path(tmp), body))
    assert summary.events["lab"] >= 1


def test_truncated_gzip_is_counted_and_keeps_what_was_read(tmp_path: Path) -> None:
    """A download cut short: the lines before the damage are kept, the file is reported."""
    body = line(patient()) + b"".join(line(observation(f"o{i}")) for i in range(2000))
    payload = gzip.compress(body)
    (tmp_path / "cut.ndjson.gz").write_bytes(payload[: len(payload) // 2])
    reader = ExportReader(tmp_path)
    records = list(reader.records())
    assert reader.stats.dropped["source:corrupt_file"] == 1
    assert any(name.startswith("cut.ndjson.gz") for name in reader.stats.skipped_files)
    assert len(records) == 1
    assert 0 < len(records[0].resources) < 2000


def test_corrupt_tar_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + b"not really a tar" * 50)
    reader = ExportReader(tmp_path / "junk.tar.gz")
    assert list(reader.records()) == []
    assert reader.stats.dropped["source:corrupt_file"] == 1
