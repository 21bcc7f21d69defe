"""The patient view in a real browser (headless Debian Chromium) against the service served
by uvicorn and the real FHIR server: the timeline has one mark per event the model saw,
the task tabs recolour the marks with that task's attributions, and nothing the page does
raises a console error or a CSP violation. The head of the page arrives before the
explanations. The screenshot lands in the test's folder."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fhir_adapter.normalize import build_timeline
from fhir_adapter.record import PatientRecord
from model.artifact import load_artifact
from model.tasks import Task
from service.app import create_app
from service.explaining import explain_scored
from service.routes.view import view_link
from service.scoring import Scorer
from service.settings import Settings
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL
from tests.support.browser import chromium, full_page_screenshot
from tests.support.threaded_server import threaded_server

STEPS = 2  # integration steps: enough to test the page, few enough to keep it quick
FIRST, SECOND = Task.MORTALITY, Task.READMISSION
MARKS_JS = """return Array.from(document.querySelectorAll('#timeline circle.event')).map(
    m => [m.dataset.token, m.dataset.time, m.getAttribute('fill'), m.dataset.attribution,
          m.querySelector('title').textContent]);"""


def _expected(loaded_fhir: LoadedServer, patient: str) -> dict[tuple[str, str], float]:
    """The second task's attribution per event, computed here from the record as the FHIR
    server holds it, the same way the service computes it."""

    async def fetch() -> PatientRecord:
        async with loaded_fhir.client() as fhir:
            return await fhir.fetch_patient(patient)

    scorer = Scorer(load_artifact(MODEL))
    now = datetime.now(UTC)
    scored = scorer.score(build_timeline(asyncio.run(fetch())), [FIRST, SECOND], 5, now)
    explained = explain_scored(scorer, scored, [SECOND], now, STEPS)[SECOND]
    return {(e.token, e.time.isoformat()): e.attribution for e in explained.events}


def _hue(fill: str) -> int:
    """1: reddish, -1: bluish, 0: grey."""
    return _sign(int(fill[1:3], 16) - int(fill[5:7], 16))


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def test_the_page_in_chromium(loaded_fhir: LoadedServer, tmp_path: Path) -> None:
    patient = loaded_fhir.records[0].patient_id
    expected = _expected(loaded_fhir, patient)
    settings = Settings(
        model_path=MODEL,
        database_url=f"sqlite:///{tmp_path / 'store.db'}",
        fhir_base_url=loaded_fhir.base_url,
        api_keys=[SecretStr("k-browser")],
        view_token_secret=SecretStr("browser-test"),
        explain_steps=STEPS,
    )
    with threaded_server(create_app(settings)) as base, chromium() as browser:
        link = view_link(settings, base, patient, loaded_fhir.base_url)
        assert link is not None
        browser.get(f"{link}&tasks={FIRST.value},{SECOND.value}")
        timeline = browser.find_element(By.ID, "timeline")
        assert timeline.get_attribute("data-task") == FIRST.value
        before = browser.execute_script(MARKS_JS)
        assert len(before) == len(expected), "one mark per event the model saw"
        assert {(token, time) for token, time, *_ in before} == set(expected)
        assert not browser.find_element(By.ID, "computing").is_displayed()

        browser.find_element(By.ID, f"tab-{SECOND.value}").click()
        WebDriverWait(browser, 10).until(
            lambda b: b.find_element(By.ID, "timeline").get_attribute("data-task") == SECOND.value
        )
        after = browser.execute_script(MARKS_JS)
        for token, time, fill, attribution, title in after:
            want = expected[(token, time)]
            assert float(attribution) == pytest.approx(want, rel=1e-3, abs=1e-7), token
            assert _hue(fill) != -_sign(want), (token, fill, want)  # grey when tiny
            assert "readmission" in title.splitlines()[-1]
        largest = max(after, key=lambda m: abs(expected[(m[0], m[1])]))
        assert _hue(largest[2]) == _sign(expected[(largest[0], largest[1])])
        assert [m[2] for m in after] != [m[2] for m in before], "the colours changed"
        assert browser.find_element(By.ID, f"reasons-{SECOND.value}").is_displayed()
        assert not browser.find_element(By.ID, f"reasons-{FIRST.value}").is_displayed()
        tab = browser.find_element(By.ID, f"tab-{SECOND.value}")
        assert tab.get_attribute("aria-selected") == "true"

        logged = browser.get_log("browser")  # type: ignore[no-untyped-call]  # selenium: untyped
        errors = [e for e in logged if e["level"] == "SEVERE"]
        assert errors == []
        assert browser.execute_script("return window.__cspViolations") == []
        full_page_screenshot(browser, tmp_path / "patient-view.png")
        assert (tmp_path / "patient-view.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # Not cached yet for this task: the head must arrive while it is being explained.
        received, head_alone = "", False
        with httpx.stream("GET", f"{link}&tasks=hypertension", timeout=120) as response:
            for chunk in response.iter_text():
                received += chunk
                notice, drawn = "Computing which events" in received, 'id="timeline"' in received
                head_alone = head_alone or (notice and not drawn)
    assert head_alone, "the page came in one piece, after the explanation"
    assert 'id="timeline"' in received
