"""The pure parts of the CDS Hooks services: discovery, the fhirServer allow-list, cards,
the request models, and building a patient's record from a prefetch, held against the
same patient read from the real FHIR server."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from pydantic import ValidationError

from fhir_adapter.auth import BearerToken, NoAuth
from fhir_adapter.client import FhirClient, FhirClientConfig
from fhir_adapter.errors import FhirError
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import JsonObject, PatientRecord
from model.artifact import Artifact, load_artifact
from model.tasks import Task
from service.cds.cards import OVERRIDE_SYSTEM, TASK_SYSTEM, cards_for
from service.cds.models import (
    CardsResponse,
    Discovery,
    FeedbackRequest,
    HookRequest,
)
from service.cds.prefetch import (
    PREFETCH_SOURCE,
    FhirServerRefused,
    PrefetchIncomplete,
    PrefetchInvalid,
    check_fhir_server,
    fhir_access,
    gather_record,
)
from service.cds.services import PREFETCH, SERVICES, CdsService, discovery
from service.scoring import Scored, Scorer
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL
from tests.support.cds import Prefetch, hook_body, next_link, prefetch_from
from tests.support.faults import FaultTransport
from tests.support.timelines import timeline_content

ALLOWED = "https://fhir.hospital.example/r4"
TOKEN = "tok-3f9a-never-show-me"


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    return load_artifact(MODEL)


# --- discovery ---------------------------------------------------------------------------


def test_discovery_describes_every_service_as_the_spec_asks() -> None:
    body = discovery(SERVICES, list(Task))
    Discovery.model_validate(body)
    services = body["services"]
    assert [s["hook"] for s in services] == [
        "patient-view",
        "encounter-start",
        "encounter-discharge",
    ]
    assert len({s["id"] for s in services}) == len(services)
    expected_prefetch = {
        "patient": "Patient/{{context.patientId}}",
        "encounters": "Encounter?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
        "medicationRequests": "MedicationRequest?patient={{context.patientId}}"
        "&_include=MedicationRequest:medication",
        "medicationAdministrations": "MedicationAdministration?patient={{context.patientId}}"
        "&_include=MedicationAdministration:medication",
        "observations": "Observation?patient={{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}",
    }
    for service in services:
        assert set(service) == {
            "hook",
            "title",
            "description",
            "id",
            "prefetch",
            "usageRequirements",
        }
        assert all(isinstance(v, str) and v for k, v in service.items() if k != "prefetch")
        assert service["prefetch"] == expected_prefetch


def test_discovery_offers_only_what_the_model_serves(artifact: Artifact) -> None:
    served = artifact.config.tasks
    assert Task.FLUID_ELECTROLYTE not in served
    body = discovery(SERVICES, served)
    assert len(body["services"]) == 3
    assert "Fluid" not in body["services"][0]["description"]
    only_readmission = discovery(SERVICES, [Task.READMISSION])["services"]
    assert [s["hook"] for s in only_readmission] == ["patient-view", "encounter-discharge"]
    assert "Death" not in only_readmission[0]["description"]
    assert discovery(SERVICES, []) == {"services": []}


# --- the fhirServer allow-list -----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        ALLOWED,
        ALLOWED + "/",
        ALLOWED + "//",
        "https://FHIR.Hospital.example/r4",
        "https://fhir.hospital.example:443/r4",
    ],
)
def test_an_allow_listed_fhir_server_is_accepted(url: str) -> None:
    assert check_fhir_server(url, ["https://other.example/fhir", ALLOWED + "/"]) == ALLOWED


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/r4",
        "https://fhir.hospital.example.evil.example/r4",
        "https://fhir.hospital.example:8443/r4",
        "https://fhir.hospital.example/r4/Patient",
        "https://fhir.hospital.example/r",
        "https://fhir.hospital.example/",
        "https://fhir.hospital.example/r4/../admin",
        "http://fhir.hospital.example/r4",
        "https://fhir.hospital.example@evil.example/r4",
        "https://user:pw@fhir.hospital.example/r4",
        "https://evil.example#@fhir.hospital.example/r4",
        "https://evil.example\\@fhir.hospital.example/r4",
        "https://fhir.hospital.example/r4?x=1",
        "https://fhir.hospital.example/r4#top",
        "https://fhir.hospital\n.example/r4",
        "https://fhir.hospital.example:99999/r4",
        "ftp://fhir.hospital.example/r4",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "//fhir.hospital.example/r4",
        "",
    ],
)
def test_any_other_fhir_server_is_refused(url: str) -> None:
    with pytest.raises(FhirServerRefused) as refused:
        check_fhir_server(url, [ALLOWED])
    assert refused.value.status == 403


async def test_fhir_access_carries_the_call_token_as_a_bearer_credential() -> None:
    assert fhir_access(_hook("p1", {}), [ALLOWED]) is None
    access = fhir_access(_hook("p1", {}, server=ALLOWED + "/", token=TOKEN), [ALLOWED])
    assert access is not None
    base, auth = access
    assert base == ALLOWED
    assert isinstance(auth, BearerToken)
    async with httpx.AsyncClient() as http:
        assert await auth.headers(http) == {"Authorization": f"Bearer {TOKEN}"}
    no_token = fhir_access(_hook("p1", {}, server=ALLOWED), [ALLOWED])
    assert no_token is not None
    assert isinstance(no_token[1], NoAuth)
    with pytest.raises(FhirServerRefused):
        fhir_access(_hook("p1", {}, server="https://evil.example/r4", token=TOKEN), [ALLOWED])


# --- cards -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def scored(artifact: Artifact, loaded_fhir: LoadedServer) -> Scored:
    record = loaded_fhir.records[-1]
    timeline = build_timeline(record)
    return Scorer(artifact).score(timeline, artifact.config.tasks, 0, datetime.now(UTC))


def _probabilities(artifact: Artifact, task: Task) -> dict[str, float]:
    limits = artifact.config.thresholds[task]
    levels = {"low": limits.moderate / 2, "high": (limits.high + 1) / 2, "certain": 1.0}
    if limits.moderate < limits.high:
        levels["moderate"] = (limits.moderate + limits.high) / 2
    return levels


def test_a_card_for_every_moderate_or_high_risk(artifact: Artifact, scored: Scored) -> None:
    url = "https://cds.example/model/card"
    patient_view = SERVICES[0]
    seen: set[UUID] = set()
    for task in artifact.config.tasks:
        for name, probability in _probabilities(artifact, task).items():
            level = artifact.config.thresholds[task].level(probability)
            at_level = replace(scored, probabilities={task: probability})
            cards = cards_for(patient_view, at_level, artifact, url)
            if level == "low":
                assert cards == [], (task, name)
                continue
            (card,) = cards
            assert card.indicator == {"moderate": "warning", "high": "critical"}[level]
            assert len(card.summary) < 140
            assert card.summary.startswith(f"{level.capitalize()} risk of ")
            assert f"({probability:.2f})" in card.summary
            assert "_" not in card.summary, "task names are for machines"
            assert f"{probability:.2f}" in card.detail
            assert f"{artifact.config.thresholds[task].high:.2f}" in card.detail
            assert f"{scored.facts.visits:,} visit" in card.detail
            assert card.source.url == url
            assert card.source.label == f"{artifact.config.name} {artifact.version}"
            assert (card.source.topic.system, card.source.topic.code) == (TASK_SYSTEM, task.value)
            assert card.override_reasons
            assert all(r.system == OVERRIDE_SYSTEM and r.display for r in card.override_reasons)
            assert card.uuid not in seen
            seen.add(card.uuid)
    auroc = artifact.metrics["tasks"]["mortality"]["ehrmamba_mpf"]["auroc"]["mean"]
    dying = replace(scored, probabilities={Task.MORTALITY: 0.99})
    (card,) = cards_for(patient_view, dying, artifact, url)
    assert f"AUROC for this task: {auroc:.2f}" in card.detail


def test_cards_answer_only_the_service_tasks_that_were_scored(
    artifact: Artifact, scored: Scored
) -> None:
    high = dict.fromkeys(artifact.config.tasks, 0.999)
    del high[Task.LENGTH_OF_STAY]
    everything_high = replace(
        scored, probabilities=high, not_scored={Task.LENGTH_OF_STAY: "no current stay"}
    )
    url = "https://cds.example/model/card"
    patient_view, encounter_start, discharge = SERVICES
    cards = cards_for(patient_view, everything_high, artifact, url)
    assert {c.source.topic.code for c in cards} == {t.value for t in high}

    def topics(service: CdsService) -> list[str]:
        return [c.source.topic.code for c in cards_for(service, everything_high, artifact, url)]

    assert topics(encounter_start) == ["mortality"]
    assert topics(discharge) == ["readmission"]
    body = CardsResponse(cards=cards).model_dump(mode="json")
    assert all("overrideReasons" in c and isinstance(c["uuid"], str) for c in body["cards"])
    mixed = dict.fromkeys(artifact.config.tasks, 0.0)
    mixed[Task.HYPERTENSION] = artifact.config.thresholds[Task.HYPERTENSION].moderate + 0.01
    mixed[Task.LIPID_METABOLISM] = 0.999
    ordered = cards_for(patient_view, replace(scored, probabilities=mixed), artifact, url)
    assert [c.indicator for c in ordered] == ["critical", "warning"]


# --- request models ----------------------------------------------------------------------


def test_hook_requests_are_validated_as_the_spec_says() -> None:
    good = hook_body("p1", {}, server=ALLOWED, token=TOKEN)
    request = HookRequest.model_validate(good)
    assert request.context.patient_id == "p1"
    assert TOKEN not in repr(request)
    assert TOKEN not in request.model_dump_json()
    broken: list[Callable[[dict[str, Any]], None]] = [
        lambda b: b.pop("fhirServer"),  # a token needs its server
        lambda b: b["fhirAuthorization"].pop("subject"),
        lambda b: b["fhirAuthorization"].update(token_type="MAC"),
        lambda b: b.update(hookInstance="not-a-uuid"),
        lambda b: b.update(hook="order-sign"),
        lambda b: b["context"].update(patientId="a b/../c"),
        lambda b: b.update(hook="encounter-discharge"),  # without context.encounterId
        lambda b: b.update(prefetch={"patient": "Patient/1"}),
    ]
    for breaking in broken:
        body = copy.deepcopy(good)
        breaking(body)
        with pytest.raises(ValidationError) as invalid:
            HookRequest.model_validate(body)
        assert TOKEN not in str(invalid.value)
    discharge = copy.deepcopy(good)
    discharge.update(hook="encounter-discharge")
    discharge["context"]["encounterId"] = "e1"
    assert HookRequest.model_validate(discharge).context.encounter_id == "e1"


def test_feedback_is_validated_as_the_spec_says() -> None:
    card = str(uuid4())
    when = "2026-01-02T03:04:05Z"
    accepted = {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": "s1"}],
        "outcomeTimestamp": when,
    }
    reason_given = {
        "reason": {"code": "disagree", "system": OVERRIDE_SYSTEM},
        "userComment": "Seen this morning.",
    }
    overridden = {
        "card": card,
        "outcome": "overridden",
        "outcomeTimestamp": when,
        "overrideReason": reason_given,
    }
    plain_override = {"card": card, "outcome": "overridden", "outcomeTimestamp": when}
    parsed = FeedbackRequest.model_validate({"feedback": [accepted, overridden, plain_override]})
    reason = parsed.feedback[1].override_reason
    assert reason is not None
    assert reason.reason is not None
    assert reason.reason.code == "disagree"
    invalid = [
        {"feedback": []},
        {"feedback": [{**accepted, "acceptedSuggestions": None}]},
        {"feedback": [{**accepted, "acceptedSuggestions": []}]},
        {"feedback": [{**accepted, "overrideReason": reason_given}]},
        {"feedback": [{**overridden, "acceptedSuggestions": [{"id": "s1"}]}]},
        {"feedback": [{**overridden, "overrideReason": {}}]},
        {"feedback": [{**overridden, "outcome": "ignored"}]},
        {"feedback": [{**overridden, "card": "card-1"}]},
        {"feedback": [{**overridden, "outcomeTimestamp": "2026-01-02T03:04:05"}]},
    ]
    for body in invalid:
        with pytest.raises(ValidationError):
            FeedbackRequest.model_validate(body)


# --- prefetch against the real FHIR server -----------------------------------------------


async def test_a_full_prefetch_gives_the_timeline_the_server_gives(
    loaded_fhir: LoadedServer,
) -> None:
    for record in loaded_fhir.records:
        pid = record.patient_id
        prefetch = await prefetch_from(loaded_fhir.base_url, pid)
        built, facts = await gather_record(_hook(pid, prefetch), pid, _no_server)
        assert built.source == PREFETCH_SOURCE
        assert (facts.fetched, facts.fetched_keys, facts.skipped) == ({}, (), {})
        assert facts.prefetched["Patient"] == 1
        assert sum(facts.prefetched.values()) == 1 + len(built.resources) + len(built.medications)
        assert _content(built) == await _served_content(loaded_fhir, pid), pid


async def test_left_out_and_failed_keys_are_read_from_fhir_server(
    loaded_fhir: LoadedServer,
) -> None:
    pid = _richest(loaded_fhir).patient_id
    prefetch = await prefetch_from(loaded_fhir.base_url, pid)
    del prefetch["patient"], prefetch["observations"]
    prefetch["encounters"] = _outcome("error")
    failed_inside = prefetch["medicationRequests"]
    assert failed_inside is not None
    failed_inside["entry"].append({"resource": _outcome("fatal"), "search": {"mode": "outcome"}})
    request = _hook(pid, prefetch, server=loaded_fhir.base_url)
    built, facts = await gather_record(request, pid, loaded_fhir.client)
    assert set(facts.fetched_keys) == {
        "patient",
        "observations",
        "encounters",
        "medicationRequests",
    }
    assert facts.fetched["Patient"] == 1
    assert facts.fetched["Observation"] > 0
    assert "Observation" not in facts.prefetched
    assert facts.prefetched["Procedure"] > 0
    assert built.source == loaded_fhir.base_url
    assert _content(built) == await _served_content(loaded_fhir, pid)


async def test_null_keys_mean_no_data_and_are_not_fetched(loaded_fhir: LoadedServer) -> None:
    pid = _richest(loaded_fhir).patient_id
    prefetch = await prefetch_from(loaded_fhir.base_url, pid)
    absent = [q.key for q in PREFETCH if q.key != "patient" and not _entries(prefetch[q.key])]
    for key in absent:  # what the spec says a client sends when a search finds nothing
        prefetch[key] = None
    built, _ = await gather_record(_hook(pid, prefetch), pid, _no_server)
    assert _content(built) == await _served_content(loaded_fhir, pid)
    only_patient = {q.key: None for q in PREFETCH} | {"patient": prefetch["patient"]}
    bare, facts = await gather_record(_hook(pid, only_patient), pid, _no_server)
    assert bare.resources == []
    assert bare.patient == prefetch["patient"]
    assert facts.prefetched == {"Patient": 1}


async def test_a_paged_prefetch_bundle_is_completed_from_fhir_server(
    loaded_fhir: LoadedServer,
) -> None:
    pid = _richest(loaded_fhir).patient_id
    prefetch = await prefetch_from(loaded_fhir.base_url, pid)
    paged = await prefetch_from(loaded_fhir.base_url, pid, page=7)
    prefetch["observations"] = paged["observations"]
    assert next_link(prefetch["observations"])
    transport = FaultTransport(lambda request, n: None)
    config = FhirClientConfig(base_url=loaded_fhir.base_url, page_size=50)
    request = _hook(pid, prefetch, server=loaded_fhir.base_url)
    built, facts = await gather_record(
        request, pid, lambda: FhirClient(config, transport=transport)
    )
    assert facts.fetched_keys == ("observations",)
    assert facts.prefetched["Observation"] == 7
    assert facts.fetched["Observation"] > 0
    assert len(transport.requests) >= 2, "every remaining page is followed"
    assert all(r.url.path.startswith("/fhir") for r in transport.requests)
    assert _content(built) == await _served_content(loaded_fhir, pid)


@pytest.mark.parametrize("gap", ["left-out", "failed", "paged", "null-patient"])
async def test_missing_data_without_fhir_server_is_412(loaded_fhir: LoadedServer, gap: str) -> None:
    pid = _richest(loaded_fhir).patient_id
    prefetch = await prefetch_from(loaded_fhir.base_url, pid)
    if gap == "left-out":
        del prefetch["conditions"]
    elif gap == "failed":
        prefetch["conditions"] = _outcome("error")
    elif gap == "paged":
        prefetch["observations"] = (await prefetch_from(loaded_fhir.base_url, pid, 5))[
            "observations"
        ]
    else:
        prefetch["patient"] = None
    with pytest.raises(PrefetchIncomplete) as incomplete:
        await gather_record(_hook(pid, prefetch), pid, lambda: None)
    assert incomplete.value.status == 412


@pytest.mark.parametrize(
    "contradiction", ["other-patient", "other-patients-encounters", "not-a-bundle", "off-server"]
)
async def test_a_prefetch_that_contradicts_the_call_is_422(
    loaded_fhir: LoadedServer, contradiction: str
) -> None:
    first, second = loaded_fhir.records[0].patient_id, loaded_fhir.records[1].patient_id
    prefetch = await prefetch_from(loaded_fhir.base_url, first)
    if contradiction == "other-patient":
        prefetch["patient"] = (await prefetch_from(loaded_fhir.base_url, second))["patient"]
    elif contradiction == "other-patients-encounters":
        theirs = (await prefetch_from(loaded_fhir.base_url, second))["encounters"]
        assert theirs is not None
        prefetch["encounters"] = theirs
    elif contradiction == "not-a-bundle":
        prefetch["conditions"] = prefetch["patient"]
    else:
        paged = (await prefetch_from(loaded_fhir.base_url, first, 5))["observations"]
        assert paged is not None
        assert next_link(paged)
        for link in paged["link"]:
            link["url"] = link["url"].replace("127.0.0.1", "localhost")
        prefetch["observations"] = paged
    request = _hook(first, prefetch, server=loaded_fhir.base_url)
    with pytest.raises(PrefetchInvalid) as invalid:
        await gather_record(request, first, loaded_fhir.client)
    assert invalid.value.status == 422


async def test_stray_entries_are_skipped_and_counted(loaded_fhir: LoadedServer) -> None:
    pid = _richest(loaded_fhir).patient_id
    prefetch = await prefetch_from(loaded_fhir.base_url, pid)
    encounters, observations = prefetch["encounters"], prefetch["observations"]
    assert encounters is not None
    assert observations is not None
    encounters["entry"] += [
        {"resource": _outcome("warning"), "search": {"mode": "outcome"}},
        observations["entry"][0],
    ]
    built, facts = await gather_record(_hook(pid, prefetch), pid, _no_server)
    assert facts.skipped == {"encounters:OperationOutcome": 1, "encounters:Observation": 1}
    assert _content(built) == await _served_content(loaded_fhir, pid)


async def test_the_access_token_never_shows_in_logs_or_errors(
    loaded_fhir: LoadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for noisy in ("httpx", "httpcore"):  # the service quiets them; here we want every line
        caplog.set_level(logging.DEBUG, logger=noisy)
    pid = loaded_fhir.records[0].patient_id
    request = _hook(pid, {}, server=loaded_fhir.base_url, token=TOKEN)
    access = fhir_access(request, [loaded_fhir.base_url])
    assert access is not None
    transport = FaultTransport(lambda request, n: None)
    config = FhirClientConfig(base_url=access[0], auth=access[1])
    built, _ = await gather_record(request, pid, lambda: FhirClient(config, transport=transport))
    assert built.resources
    assert {r.headers["Authorization"] for r in transport.requests} == {f"Bearer {TOKEN}"}
    texts = [repr(config), repr(request), repr(access)]
    down = FhirClientConfig(base_url="http://127.0.0.1:9/fhir", auth=access[1], max_retries=0)
    with pytest.raises(FhirError) as unreachable:
        await gather_record(request, pid, lambda: FhirClient(down))
    texts += [str(unreachable.value), repr(unreachable.value)]
    with pytest.raises(FhirServerRefused) as refused:
        fhir_access(_hook(pid, {}, server=f"https://{TOKEN}@evil.example/", token=TOKEN), [])
    texts += [str(refused.value)]
    with pytest.raises(PrefetchIncomplete) as incomplete:
        await gather_record(request, pid, lambda: None)
    texts += [str(incomplete.value)]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.args) for record in caplog.records]
    assert caplog.records, "the FHIR client's HTTP library logs each request"
    assert not [text for text in texts if TOKEN in text]


# --- helpers -----------------------------------------------------------------------------


def _hook(
    patient_id: str, prefetch: Prefetch, server: str | None = None, token: str | None = None
) -> HookRequest:
    return HookRequest.model_validate(hook_body(patient_id, prefetch, server, token))


def _no_server() -> FhirClient | None:
    raise AssertionError("a complete prefetch needs no FHIR server")


async def _served_content(loaded: LoadedServer, patient_id: str) -> tuple[object, ...]:
    async with loaded.client() as fhir:
        return _content(await fhir.fetch_patient(patient_id))


def _content(record: PatientRecord) -> tuple[object, ...]:
    return timeline_content(build_timeline(record))


def _richest(loaded: LoadedServer) -> PatientRecord:
    return max(loaded.records, key=lambda r: len(r.resources))


def _entries(value: JsonObject | None) -> list[Any]:
    return list((value or {}).get("entry") or [])


def _outcome(severity: str) -> JsonObject:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": "exception", "diagnostics": "prefetch failed"}],
    }
