"""Take docs/images/patient-view.png: the patient view of the demo's example patient (one
still in hospital, so every task is scored) in headless Chromium, served and looked at the
way tests/service/test_view_browser.py does, with the default explanation steps.

It uses the demo's sample patients and FHIR data in .cache/demo, drawing and loading them
first if missing (a few minutes, once), and installs Chromium if missing
(scripts/install-chromium, as root).

Usage: .venv/bin/python scripts/screenshot_view.py [--patient ID] [--task TASK] [--out PNG]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By

from cli.demo import CACHE, MODEL
from cli.demo_samples import ensure_fhir_data, ensure_samples, sample_server
from fhir_adapter.local_server import install_fhir_server
from service.app import create_app
from service.routes.view import view_link
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the browser helpers live with the tests that use them
from tests.support.browser import chromium, full_page_screenshot  # noqa: E402
from tests.support.threaded_server import threaded_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", help="A demo patient's id (default: the demo's example).")
    parser.add_argument("--task", help="The tab to show (default: the first).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "patient-view.png")
    args = parser.parse_args()
    samples = ensure_samples(CACHE, print)
    sekmet = install_fhir_server()
    data = ensure_fhir_data(CACHE, samples, sekmet, print)
    patient = args.patient or samples.example
    with (
        sample_server(data, sekmet) as fhir,
        tempfile.TemporaryDirectory(prefix="ehrmamba-screenshot-") as tmp,
    ):
        settings = Settings(
            model_path=MODEL,
            fhir_base_url=fhir.base_url,
            database_url=f"sqlite:///{Path(tmp) / 'store.db'}",
            redis_url=None,
            api_keys=[],
        )
        with threaded_server(create_app(settings)) as base, chromium() as browser:
            link = view_link(settings, base, patient, fhir.base_url)
            assert link is not None
            print(f"Explaining patient {patient} (about a minute) ...")
            browser.get(link)
            if args.task:
                browser.find_element(By.ID, f"tab-{args.task}").click()
            full_page_screenshot(browser, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
