"""``GET /patients/{id}/view`` against the real FHIR server: the page for a real patient
with an API key or a card's signed link, refusals as HTML pages, hostile names escaped,
and a patient with nothing to draw."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import SecretStr

import service.routes.view
from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from fhir_adapter.upload import upload_record
from model.artifact import Artifact, load_artifact
from model.tasks import Task
from service.cds.cards import VIEW_LABEL, cards_for
from service.cds.services import SERVICES
from service.routes.view import view_link
from service.scoring import Scorer
from service.settings import Settings
from service.view_token import ViewTokens
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL, ApiFactory

KEY = "k-view"
SECRET = "view-secret-for-tests"
FAST = {"explain_steps": 1, "view_token_secret": SECRET, "api_keys": [KEY]}
EVENT_MARK = re.compile(r'<circle class="event"')


def _settings(loaded_fhir: LoadedServer) -> Settings:
    return Settings(fhir_base_url=loaded_fhir.base_url, view_token_secret=SecretStr(SECRET))


def _nonce(response: httpx.Response) -> str:
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    found = re.search(r"script-src 'nonce-([^']+)'", policy)
    assert found is not None, policy
    return found.group(1)


def _page(response: httpx.Response, status: int = 200) -> str:
    assert response.status_code == status, response.text[-2000:]
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    nonce = _nonce(response)
    for tag in re.findall(r"<(?:script|style)\b[^>]*>", response.text):
        assert f'nonce="{nonce}"' in tag, tag  # nothing runs that the page did not put there
    return " ".join(response.text.split())


async def test_the_page_shows_risks_forecast_and_timeline_with_an_api_key(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[0].patient_id
    async with make_api(fhir_base_url=loaded_fhir.base_url, **FAST) as api:
        wanted = {"tasks": "mortality,readmission,length_of_stay"}
        text = _page(await api.get(f"/patients/{patient}/view", params=wanted,
                                   headers={"X-API-Key": KEY}))  # fmt: skip
        history = await api.get(f"/patients/{patient}/predictions", headers={"X-API-Key": KEY})
    assert f'<span class="id">{patient}</span>' in text
    for task in (Task.MORTALITY, Task.READMISSION):
        assert f'<tr data-task="{task.value}">' in text
        assert f'id="tab-{task.value}"' in text
        assert f'id="reasons-{task.value}"' in text
    assert re.search(r'class="level (low|moderate|high)">(Low|Moderate|High) risk<', text)
    assert "Not scored: no current inpatient stay" in text  # length of stay, for this patient
    assert 'id="tab-length_of_stay"' not in text
    assert len(re.findall(r"<li>[^<]+<span class=\"num\">", text)) == 5  # the forecast
    assert "Computing which events raised and lowered 2 risks" in text
    assert "#computing { display: none; }" in text  # hidden once the reasons came
    marks = len(EVENT_MARK.findall(text))
    assert marks > 10
    assert f"Timeline of {marks} events" in text
    assert "fifths of the training patients' values, not reference ranges" in text
    newest = history.json()["predictions"][0]
    assert newest["source"] == "view"
    assert set(newest["tasks"]) == {"mortality", "readmission", "length_of_stay"}


async def test_a_cards_link_opens_the_page_and_bad_links_are_refused(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    patient, other = (r.patient_id for r in loaded_fhir.records[:2])
    settings = _settings(loaded_fhir)
    link = view_link(settings, "http://service", patient, loaded_fhir.base_url + "/")
    assert link is not None
    assert link.startswith(f"http://service/patients/{patient}/view?token=")
    assert view_link(settings, "http://service", patient, "https://elsewhere.example/fhir") is None
    tokens = ViewTokens.from_settings(settings)
    expired = tokens.issue(patient, loaded_fhir.base_url, now=0)
    others = tokens.issue(other, loaded_fhir.base_url)
    forged = ViewTokens(b"not the key", 900).issue(patient, loaded_fhir.base_url)
    async with make_api(fhir_base_url=loaded_fhir.base_url, **FAST) as api:
        ok = await api.get(link.removeprefix("http://service") + "&tasks=mortality")
        assert "Patient <span" in _page(ok)
        url = f"/patients/{patient}/view"
        refusals = {
            "no credentials": await api.get(url),
            "wrong key": await api.get(url, headers={"X-API-Key": "nope"}),
            "expired": await api.get(url, params={"token": expired}),
            "another patient's": await api.get(url, params={"token": others}),
            "forged": await api.get(url, params={"token": forged}),
            "malformed": await api.get(url, params={"token": "<b>x</b>"}),
        }
    for why, refused in refusals.items():
        text = _page(refused, 401)
        assert "The link has expired or does not open this patient" in text, why
        assert "<b>x</b>" not in text
    assert "(expired)" in refusals["expired"].text
    assert "(signature)" in refusals["another patient's"].text


async def test_an_unknown_patient_is_a_404_page(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    async with make_api(fhir_base_url=loaded_fhir.base_url, **FAST) as api:
        text = _page(await api.get("/patients/no-such-patient-9/view",
                                   headers={"X-API-Key": KEY}), 404)  # fmt: skip
        bad_id = await api.get("/patients/a%20b$/view", headers={"X-API-Key": KEY})
    assert "patient not found on the FHIR server" in text
    assert "not a FHIR id" in _page(bad_id, 422)


async def test_hostile_names_are_shown_as_text(
    make_api: ApiFactory, loaded_fhir: LoadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>'\""

    def display(self: Artifact, token: str) -> str:
        return f"{hostile} {token}"

    monkeypatch.setattr(Artifact, "display", display)
    patient = loaded_fhir.records[0].patient_id
    async with make_api(fhir_base_url=loaded_fhir.base_url, **FAST) as api:
        text = _page(await api.get(f"/patients/{patient}/view", params={"tasks": "mortality"},
                                   headers={"X-API-Key": KEY}))  # fmt: skip
    assert "<script>alert" not in text
    assert "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in text
    assert "\\u003cscript\\u003ealert(1)" in text  # inside the page's JSON data too


async def test_a_patient_without_events_gets_a_page_that_says_so(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    """One visit and nothing in it is scored and has nothing to draw; no visit at all
    cannot be scored, as on predict."""

    def bare(patient_id: str, visits: int) -> PatientRecord:
        encounter = {
            "resourceType": "Encounter", "id": f"{patient_id}-visit", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB"},
            "subject": {"reference": f"Patient/{patient_id}"},
            "period": {"start": "2024-05-01T09:00:00Z", "end": "2024-05-01T10:00:00Z"},
        }  # fmt: skip
        patient = {"resourceType": "Patient", "id": patient_id, "birthDate": "1950-02-03"}
        return PatientRecord(patient_id, patient, [encounter] * visits, loaded_fhir.base_url)

    async with loaded_fhir.client() as fhir:
        await upload_record(fhir, bare("view-empty-visit", 1))
        await upload_record(fhir, bare("view-no-visit", 0))
    async with make_api(fhir_base_url=loaded_fhir.base_url, **FAST) as api:
        key = {"X-API-Key": KEY}
        empty = _page(await api.get("/patients/view-empty-visit/view", headers=key))
        nothing = _page(await api.get("/patients/view-no-visit/view", headers=key), 422)
    assert "holds no clinical events" in empty
    assert re.search(r'class="level (low|moderate|high)">', empty), "scored all the same"
    assert not EVENT_MARK.search(empty)
    assert "cannot score this patient: the record holds nothing to score" in nothing


async def test_a_failed_explanation_still_finishes_the_page(
    make_api: ApiFactory, loaded_fhir: LoadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(service.routes.view, "explain_cached", broken)
    patient = loaded_fhir.records[0].patient_id
    async with make_api(fhir_base_url=loaded_fhir.base_url, **FAST) as api:
        text = _page(await api.get(f"/patients/{patient}/view", headers={"X-API-Key": KEY}))
    assert 'class="level' in text  # the risks were sent before the explanation failed
    assert "The reasons could not be computed" in text
    assert "out of memory" not in text
    assert text.endswith("</html>")


def test_cards_carry_the_view_link_when_given_one(loaded_fhir: LoadedServer) -> None:
    artifact = load_artifact(MODEL)
    timeline = build_timeline(loaded_fhir.records[0])
    scored = Scorer(artifact).score(timeline, artifact.config.tasks, 0, datetime.now(UTC))
    everything_high = replace(scored, probabilities=dict.fromkeys(artifact.config.tasks, 0.99))
    card_url, url = "https://service.example/model/card", "https://service.example/p?token=1.a"
    cards = cards_for(SERVICES[0], everything_high, artifact, card_url, url)
    assert cards
    for card in cards:
        link = {"label": VIEW_LABEL, "url": url, "type": "absolute"}
        assert card.model_dump(mode="json", by_alias=True)["links"] == [link]
    assert all(c.links == [] for c in cards_for(SERVICES[0], everything_high, artifact, card_url))
