"""CDS Hooks 2.0 conformance, through HTTP, against the real FHIR server: discovery, each
hook with full, partial, null and no prefetch, neither prefetch nor fhirServer (412),
card rules, feedback rules, client JWT checks, the fhirServer allow-list (no connection to
anything else), and no patient identifier in logs or metrics afterwards."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import orjson
import pytest

from fhir_adapter.normalize import build_timeline
from model.artifact import load_artifact
from model.tasks import Task
from service.cds.client_token import ClientKey, sign_client_token
from service.cds.services import PREFETCH
from service.explaining import explain_scored
from service.scoring import Scorer
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL, ApiFactory
from tests.support.cds import Prefetch, hook_body, prefetch_from

ARTIFACT = load_artifact(MODEL)
ISSUER = "https://ehr.hospital.example"
BASE = "http://service"
SERVICES = {
    "patient-view": "ehrmamba-patient-view",
    "encounter-start": "ehrmamba-encounter-start",
    "encounter-discharge": "ehrmamba-encounter-discharge",
}


class Client:
    """A CDS client: signs a fresh JWT for every call, as the spec asks."""

    def __init__(self, api: httpx.AsyncClient, key: ClientKey) -> None:
        self.api = api
        self.key = key

    def token(self, path: str, **overrides: Any) -> str:
        return sign_client_token(self.key, ISSUER, BASE + path, **overrides)

    async def post(
        self, path: str, body: dict[str, Any], token: str | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token(path)}"}
        return await self.api.post(path, json=body, headers=headers)


@pytest.fixture(scope="module")
def client_key() -> ClientKey:
    return ClientKey.generate("ES384")


def _cds_app(
    make_api: ApiFactory,
    loaded_fhir: LoadedServer,
    client_key: ClientKey,
    tmp_path: Path,
    **overrides: object,
) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    jwks = tmp_path / "ehr-jwks.json"
    jwks.write_bytes(orjson.dumps(client_key.public_jwks()))
    return make_api(
        fhir_base_url=loaded_fhir.base_url,
        fhir_server_allow=[loaded_fhir.base_url],
        cds_issuers=[{"iss": ISSUER, "jwks_file": str(jwks)}],
        **overrides,
    )


@pytest.fixture
async def cds(
    make_api: ApiFactory, loaded_fhir: LoadedServer, client_key: ClientKey, tmp_path: Path
) -> AsyncIterator[Client]:
    async with _cds_app(make_api, loaded_fhir, client_key, tmp_path) as api:
        yield Client(api, client_key)


def _body(hook: str, patient: str, encounter: str, prefetch: Prefetch | None,
          server: str | None) -> dict[str, Any]:  # fmt: skip
    body = hook_body(patient, prefetch or {}, server)
    body["hook"] = hook
    if prefetch is None:
        del body["prefetch"]
    if hook != "patient-view":
        body["context"]["encounterId"] = encounter
    return body


def _last_encounter(loaded: LoadedServer, patient: str) -> str:
    record = next(r for r in loaded.records if r.patient_id == patient)
    return build_timeline(record).visits[-1].encounter_ids[0]


def _card_view(cards: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(c["summary"], c["indicator"], c["source"]["topic"]["code"]) for c in cards]


def _assert_outcome(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


async def test_discovery(cds: Client) -> None:
    response = await cds.api.get("/cds-services")
    assert response.status_code == 200
    services = response.json()["services"]
    assert {s["hook"]: s["id"] for s in services} == SERVICES
    for service in services:
        assert {"hook", "title", "description", "id", "prefetch"} <= set(service)
        assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
        assert set(service["prefetch"]) == {q.key for q in PREFETCH}


@pytest.mark.parametrize("hook", list(SERVICES))
async def test_every_way_of_getting_the_data_gives_the_same_cards(
    cds: Client, loaded_fhir: LoadedServer, hook: str
) -> None:
    path = f"/cds-services/{SERVICES[hook]}"
    server = loaded_fhir.base_url
    seen_cards = 0
    for record in loaded_fhir.records:
        patient = record.patient_id
        encounter = _last_encounter(loaded_fhir, patient)
        full = await prefetch_from(server, patient)
        answers = {}
        ways: dict[str, tuple[Prefetch | None, str | None]] = {
            "full prefetch, no server": (full, None),
            "partial prefetch + server": ({k: v for k, v in full.items()
                                           if k in ("patient", "observations")}, server),
            "no prefetch + server": (None, server),
        }  # fmt: skip
        for way, (prefetch, fhir_server) in ways.items():
            response = await cds.post(path, _body(hook, patient, encounter, prefetch, fhir_server))
            assert response.status_code == 200, (way, response.text)
            answers[way] = response.json()["cards"]
        views = {way: _card_view(cards) for way, cards in answers.items()}
        assert len(set(map(tuple, views.values()))) == 1, views
        for cards in answers.values():
            _check_cards(cards, hook)
        seen_cards += len(answers["no prefetch + server"])
    if hook == "patient-view":
        assert seen_cards > 0, "the sample patients must raise at least one card"


def _check_cards(cards: list[dict[str, Any]], hook: str) -> None:
    allowed = {"patient-view": None, "encounter-start": {"mortality", "length_of_stay"},
               "encounter-discharge": {"readmission"}}[hook]  # fmt: skip
    for card in cards:
        UUID(card["uuid"])
        assert 0 < len(card["summary"]) < 140
        assert card["indicator"] in {"warning", "critical"}
        assert card["source"]["label"] == f"{ARTIFACT.config.name} {ARTIFACT.version}"
        level = card["summary"].split(" ", 1)[0].lower()
        assert card["indicator"] == {"moderate": "warning", "high": "critical"}[level]
        assert card["source"]["url"] == f"{BASE}/model/card"
        assert card["overrideReasons"]
        assert all({"code", "system"} <= set(r) for r in card["overrideReasons"])
        if allowed is not None:
            assert card["source"]["topic"]["code"] in allowed
    assert len({c["uuid"] for c in cards}) == len(cards)


async def test_null_prefetch_keys_mean_no_data(cds: Client, loaded_fhir: LoadedServer) -> None:
    patient = loaded_fhir.records[0].patient_id
    full = await prefetch_from(loaded_fhir.base_url, patient)
    assert any((full[k] or {}).get("entry") for k in ("procedures", "conditions"))
    nulled = {**full, "procedures": None, "conditions": None}
    body = _body("patient-view", patient, "", nulled, loaded_fhir.base_url)
    response = await cds.post("/cds-services/ehrmamba-patient-view", body)
    assert response.status_code == 200, response.text
    history = (await cds.api.get(f"/patients/{patient}/predictions")).json()["predictions"]
    assert history[0]["source"] == "cds:ehrmamba-patient-view"
    assert "Procedure" not in history[0]["data"]["resources"]
    assert "Condition" not in history[0]["data"]["resources"]


async def test_neither_prefetch_nor_fhir_server_is_412(
    cds: Client, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[0].patient_id
    partial = {"patient": (await prefetch_from(loaded_fhir.base_url, patient))["patient"]}
    for prefetch in (None, partial):
        response = await cds.post("/cds-services/ehrmamba-patient-view",
                                  _body("patient-view", patient, "", prefetch, None))  # fmt: skip
        assert "fhirServer" in _assert_outcome(response, 412)


async def test_wrong_hook_unknown_service_and_bad_bodies(cds: Client) -> None:
    body = _body("patient-view", "p1", "", None, None)
    _assert_outcome(await cds.post("/cds-services/ehrmamba-encounter-start", body), 422)
    _assert_outcome(await cds.post("/cds-services/nope", body), 404)
    missing_encounter = {**body, "hook": "encounter-start"}
    _assert_outcome(
        await cds.post("/cds-services/ehrmamba-encounter-start", missing_encounter), 422
    )
    _assert_outcome(await cds.post("/cds-services/ehrmamba-patient-view", {"hook": 1}), 422)


@pytest.fixture
def listener() -> Iterator[tuple[str, list[int]]]:
    """A loopback port that counts connections made to it."""
    accepted: list[int] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/fhir", accepted
    stop.set()
    thread.join()
    server.close()


async def test_a_fhir_server_off_the_allow_list_is_refused_without_a_connection(
    cds: Client, listener: tuple[str, list[int]]
) -> None:
    url, accepted = listener
    for fhir_server in (url, "http://169.254.169.254/latest", "http://localhost:6379/"):
        body = _body("patient-view", "p1", "", None, fhir_server)
        body["fhirAuthorization"] = {"access_token": "secret-token-xyz", "token_type": "Bearer",
                                     "expires_in": 300, "scope": "patient/*.read",
                                     "subject": "ehrmamba"}  # fmt: skip
        response = await cds.post("/cds-services/ehrmamba-patient-view", body)
        diagnostics = _assert_outcome(response, 403)
        assert "secret-token-xyz" not in diagnostics
    assert accepted == []


async def test_feedback_is_stored_once(cds: Client) -> None:
    path = "/cds-services/ehrmamba-patient-view/feedback"
    item = {"card": str(uuid4()), "outcome": "overridden",
            "overrideReason": {"reason": {"code": "not-relevant",
                                          "system": "urn:ehrmamba:cds-override-reason"},
                               "userComment": "known, already treated"},
            "outcomeTimestamp": "2026-11-27T10:00:00Z"}  # fmt: skip
    first = await cds.post(path, {"feedback": [item]})
    assert first.status_code == 200, first.text
    assert first.json() == {"stored": 1, "duplicates": 0}
    again = await cds.post(path, {"feedback": [item]})
    assert again.json() == {"stored": 0, "duplicates": 1}
    accepted = {"card": str(uuid4()), "outcome": "accepted",
                "outcomeTimestamp": "2026-11-27T10:00:00Z"}  # fmt: skip
    _assert_outcome(await cds.post(path, {"feedback": [accepted]}), 422)  # no suggestions
    _assert_outcome(await cds.post("/cds-services/nope/feedback", {"feedback": [item]}), 404)
    metrics = (await cds.api.get("/metrics")).text
    assert 'ehrmamba_cds_feedback_total{outcome="overridden",service="ehrmamba-patient-view"}' in (
        metrics
    )


async def test_client_tokens_are_checked_on_every_call(
    cds: Client, loaded_fhir: LoadedServer
) -> None:
    path = "/cds-services/ehrmamba-patient-view"
    body = _body("patient-view", loaded_fhir.records[0].patient_id, "", None, loaded_fhir.base_url)
    no_token = await cds.api.post(path, json=body)
    assert "missing" in _assert_outcome(no_token, 401)
    other_aud = cds.token("/cds-services/ehrmamba-encounter-start")
    assert "aud" in _assert_outcome(await cds.post(path, body, other_aud), 401)
    token = cds.token(path)
    assert (await cds.post(path, body, token)).status_code == 200
    assert "replay" in _assert_outcome(await cds.post(path, body, token), 401)
    stranger = ClientKey.generate("ES384", kid=cds.key.kid)
    forged = sign_client_token(stranger, ISSUER, BASE + path)
    assert "signature" in _assert_outcome(await cds.post(path, body, forged), 401)
    feedback = {"feedback": [{"card": str(uuid4()), "outcome": "overridden",
                              "outcomeTimestamp": "2026-11-27T10:00:00Z"}]}  # fmt: skip
    wrong = cds.token(path)  # signed for the service, not its feedback endpoint
    assert "aud" in _assert_outcome(await cds.post(path + "/feedback", feedback, wrong), 401)
    metrics = (await cds.api.get("/metrics")).text
    for reason in ("missing", "aud", "replay", "signature"):
        assert f'ehrmamba_jwt_rejections_total{{reason="{reason}"}}' in metrics


async def test_no_patient_identifier_reaches_logs_or_metrics(
    cds: Client, loaded_fhir: LoadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ids = [r.patient_id for r in loaded_fhir.records]
    for patient in ids:
        assert (await cds.api.post(f"/patients/{patient}/predict")).status_code == 200
        assert (await cds.api.get(f"/patients/{patient}/predictions")).status_code == 200
        body = _body("patient-view", patient, "", None, loaded_fhir.base_url)
        assert (await cds.post("/cds-services/ehrmamba-patient-view", body)).status_code == 200
    await cds.api.post("/patients/unknown-patient-77/predict")
    text = (await cds.api.get("/metrics")).text + "\n".join(
        f"{r.name} {r.getMessage()} {r.args}" for r in caplog.records
    )
    assert caplog.records or text, "nothing was captured"
    for patient in [*ids, "unknown-patient-77"]:
        assert patient not in text, patient
    assert 'route="/patients/{patient_id}/predict"' in text


async def _carded(cds: Client, loaded_fhir: LoadedServer) -> tuple[str, list[dict[str, Any]]]:
    """The first sample patient with patient-view cards, and its cards."""
    for record in loaded_fhir.records:
        full = await prefetch_from(loaded_fhir.base_url, record.patient_id)
        response = await cds.post(f"/cds-services/{SERVICES['patient-view']}",
                                  hook_body(record.patient_id, full))  # fmt: skip
        assert response.status_code == 200, response.text
        if response.json()["cards"]:
            return record.patient_id, response.json()["cards"]
    raise AssertionError("the sample patients must raise at least one card")


def _reasons(card: dict[str, Any]) -> list[str]:
    return [line[2:] for line in card["detail"].splitlines() if line.startswith("- ")]


async def test_cards_list_the_three_events_that_raised_them_in_words(
    make_api: ApiFactory, loaded_fhir: LoadedServer, client_key: ClientKey, tmp_path: Path
) -> None:
    async with _cds_app(make_api, loaded_fhir, client_key, tmp_path,
                        cds_explain_wait=600) as api:  # fmt: skip
        patient, cards = await _carded(Client(api, client_key), loaded_fhir)
    async with loaded_fhir.client() as fhir:
        record = await fhir.fetch_patient(patient)
    scorer = Scorer(ARTIFACT)
    now = datetime.now(UTC)
    scored = scorer.score(build_timeline(record), scorer.tasks, 0, now)
    direct = explain_scored(scorer, scored, scorer.tasks, now, steps=4)
    for card in cards:
        task = Task(card["source"]["topic"]["code"])
        expected = [e.words for e in direct[task].contributing(3)]
        assert "What raised this estimate most" in card["detail"]
        assert _reasons(card) == expected
        assert 0 < len(expected) <= 3
        assert all(re.search(r"\(\d{4}-\d{2}-\d{2}\)$", words) for words in expected)


async def test_reasons_too_slow_for_the_hook_follow_on_the_next_call(
    make_api: ApiFactory, loaded_fhir: LoadedServer, client_key: ClientKey, tmp_path: Path
) -> None:
    async with _cds_app(make_api, loaded_fhir, client_key, tmp_path,
                        cds_explain_wait=0) as api:  # fmt: skip
        cds = Client(api, client_key)
        patient, cards = await _carded(cds, loaded_fhir)
        assert all("still being computed" in card["detail"] for card in cards)
        assert all(_reasons(card) == [] for card in cards)
        full = await prefetch_from(loaded_fhir.base_url, patient)
        for _ in range(600):  # the background work lands in the cache
            response = await cds.post(f"/cds-services/{SERVICES['patient-view']}",
                                      hook_body(patient, full))  # fmt: skip
            later = response.json()["cards"]
            if all(_reasons(card) for card in later):
                break
            await asyncio.sleep(0.1)
        assert [c["summary"] for c in later] == [c["summary"] for c in cards]
        assert all(_reasons(card) for card in later), "reasons arrive once computed"
