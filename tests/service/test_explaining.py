"""``explain=true``: the events behind each score, equal to explaining the same input
directly, in words, cached per input and recomputed when the input changes."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest

from fhir_adapter.normalize import build_timeline
from model.artifact import load_artifact
from model.tasks import Task
from service import metrics
from service.explaining import LAB_LEVELS, ago, event_words, explain_scored
from service.scoring import Scorer
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL, ApiFactory
from tests.support.fhir_writes import delete_resources, new_visit, put_resources

STEPS = 4  # few steps keep the test short; equality with the direct call holds at any count
NOW = datetime(2024, 3, 5, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("elapsed", "words"),
    [
        (timedelta(minutes=-5), "scheduled later"),
        (timedelta(minutes=59), "within the last hour"),
        (timedelta(hours=1), "1 hour ago"),
        (timedelta(hours=23, minutes=59), "23 hours ago"),
        (timedelta(days=1, hours=3), "yesterday"),
        (timedelta(days=3), "3 days ago"),
        (timedelta(days=13), "13 days ago"),
        (timedelta(days=14), "2 weeks ago"),
        (timedelta(days=70), "2 months ago"),
        (timedelta(days=800), "2 years ago"),
    ],
)
def test_ago_uses_the_largest_whole_unit(elapsed: timedelta, words: str) -> None:
    assert ago(elapsed) == words


def test_event_words_name_the_lab_level_and_the_date() -> None:
    when = NOW - timedelta(days=3)
    assert event_words("LOINC|2160-0#4", "Creatinine", when, NOW) == (
        "Creatinine very high, 3 days ago (2024-03-02)"
    )
    assert event_words("LOINC|2160-0#1", "Creatinine", when, NOW).startswith("Creatinine low,")
    # No display anywhere in the data: the code itself, never an empty name.
    assert event_words("RXNORM|197361", None, when, NOW).startswith("RXNORM|197361, 3 days")
    assert len(LAB_LEVELS) == 5  # one word per lab bin (fhir_adapter.lab_bins.N_BINS)


def _count(result: str) -> float:
    return float(metrics.CACHE_REQUESTS.labels("explanation", result)._value.get())


async def test_explanations_equal_the_direct_explanation_and_are_cached(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    record = min(loaded_fhir.records, key=lambda r: len(r.resources))
    patient = record.patient_id
    params = {"tasks": "mortality,hypertension", "explain": "true"}
    async with make_api(
        fhir_base_url=loaded_fhir.base_url, explain_steps=STEPS, explain_top=3
    ) as api:
        response = await api.post(f"/patients/{patient}/predict", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        hits = _count("hit")
        again = (await api.post(f"/patients/{patient}/predict", params=params)).json()
        assert _count("hit") == hits + 2, "the second call reads both tasks from the cache"
        plain = (await api.post(f"/patients/{patient}/predict")).json()
    assert "explain_s" in body["timings"]
    assert plain["explanations"] is None
    assert "explain_s" not in plain["timings"]

    scorer = Scorer(load_artifact(MODEL))
    async with loaded_fhir.client() as fhir:
        fetched = await fhir.fetch_patient(patient)
    now = datetime.now(UTC)
    scored = scorer.score(build_timeline(fetched), [Task.MORTALITY, Task.HYPERTENSION], 0, now)
    direct = explain_scored(scorer, scored, list(scored.probabilities), now, steps=STEPS)
    for task in ("mortality", "hypertension"):
        answer = body["explanations"][task]
        assert again["explanations"][task] == answer
        expected = direct[Task(task)]
        assert answer["probability"] == pytest.approx(body["predictions"][task]["probability"])
        assert answer["steps"] == STEPS
        assert answer["completeness_gap"] == pytest.approx(expected.completeness_gap, abs=1e-5)
        up, down = answer["contributing"], answer["protective"]
        assert 0 < len(up) <= 3
        assert len(down) <= 3
        assert [e["token"] for e in up] == [e.token for e in expected.contributing(3)]
        assert [e["token"] for e in down] == [e.token for e in expected.protective(3)]
        assert all(e["attribution"] > 0 for e in up)
        assert all(e["attribution"] < 0 for e in down)
        sizes = [abs(e["attribution"]) for e in up]
        assert sizes == sorted(sizes, reverse=True)
        for event in up + down:
            assert event["display"] == scorer.artifact.display(event["token"])
            assert event["words"].startswith(event["display"] or event["code"])
            assert event["time"][:10] in event["words"]


async def test_new_data_is_explained_again_not_read_from_the_cache(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    record = min(loaded_fhir.records, key=lambda r: len(r.resources))
    patient = record.patient_id
    params = {"tasks": "hypertension", "explain": "true"}
    added = new_visit(patient, f"explain-{secrets.token_hex(3)}", datetime.now(UTC) - HOUR)
    async with make_api(fhir_base_url=loaded_fhir.base_url, explain_steps=STEPS) as api:
        first = (await api.post(f"/patients/{patient}/predict", params=params)).json()
        async with loaded_fhir.client() as fhir:
            await put_resources(fhir, added)
            try:
                misses = _count("miss")
                second = (await api.post(f"/patients/{patient}/predict", params=params)).json()
                assert _count("miss") == misses + 1
            finally:
                await delete_resources(fhir, added)
    assert second["data"]["tokens"] > first["data"]["tokens"]
    assert second["explanations"] != first["explanations"]
