"""``POST /patients/{id}/predict`` against the real FHIR server: answers equal scoring the
same record directly, and every failure is an OperationOutcome with the right status."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_adapter.normalize import build_timeline
from model.artifact import load_artifact
from model.onnx_step import OnnxStep
from model.tasks import Task
from service.scoring import Scorer
from tests.conftest import LoadedServer
from tests.service.conftest import MODEL, ApiFactory

SERVED = {t.value for t in load_artifact(MODEL).config.tasks}


def _outcome(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error"
    return str(issue["diagnostics"])


async def test_every_loaded_patient_is_scored_like_a_direct_engine_call(
    api: httpx.AsyncClient, loaded_fhir: LoadedServer
) -> None:
    scorer = Scorer(load_artifact(MODEL))
    for record in loaded_fhir.records:
        response = await api.post(f"/patients/{record.patient_id}/predict")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["sha256"] == scorer.artifact.sha256
        assert set(body["predictions"]) | set(body["not_scored"]) == SERVED
        async with loaded_fhir.client() as fhir:
            fetched = await fhir.fetch_patient(record.patient_id)
        direct = scorer.score(build_timeline(fetched), scorer.tasks, 0, datetime.now(UTC))
        for task, answer in body["predictions"].items():
            assert 0.0 <= answer["probability"] <= 1.0
            assert answer["probability"] == pytest.approx(
                direct.probabilities[Task(task)], abs=1e-6
            )
            assert answer["risk"] == scorer.artifact.config.thresholds[Task(task)].level(
                answer["probability"]
            )
        assert body["data"]["tokens"] == direct.facts.tokens > 1
        assert body["data"]["resources"]["Patient"] == 1
        assert set(body["timings"]) == {"fetch_s", "tokenize_s", "queue_s", "score_s"}


async def test_chosen_tasks_and_a_forecast(
    api: httpx.AsyncClient, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[0].patient_id
    params: dict[str, str | int] = {"tasks": "mortality,hypertension", "forecast": 3}
    response = await api.post(f"/patients/{patient}/predict", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["predictions"]) == {"mortality", "hypertension"}
    steps = body["forecast"]
    assert len(steps) == 3
    artifact = load_artifact(MODEL)
    for step in steps:
        assert step["code"] == step["token"].split("#")[0]
        assert step["display"] == artifact.display(step["token"])
        assert step["display"], "every forecast token has words for it"
        assert all(c["display"] == artifact.display(c["token"]) for c in step["candidates"])
        assert len(step["candidates"]) == 5
        assert step["candidates"][0]["probability"] >= step["candidates"][-1]["probability"]


async def test_bad_requests_are_422_outcomes(
    api: httpx.AsyncClient, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[0].patient_id
    assert "unknown tasks" in _outcome(
        await api.post(f"/patients/{patient}/predict", params={"tasks": "astrology"}), 422
    )
    assert "does not serve" in _outcome(
        await api.post(f"/patients/{patient}/predict", params={"tasks": "fluid_electrolyte"}), 422
    )
    _outcome(await api.post(f"/patients/{patient}/predict", params={"forecast": -1}), 422)
    _outcome(await api.post(f"/patients/{patient}/predict", params={"forecast": 10_000}), 422)
    assert "FHIR id" in _outcome(await api.post("/patients/a%20b$/predict"), 422)


async def test_unknown_patient_is_404(api: httpx.AsyncClient) -> None:
    assert "not found" in _outcome(await api.post("/patients/no-such-patient-1/predict"), 404)


async def test_fhir_server_down_is_502_quickly(make_api: ApiFactory) -> None:
    async with make_api(fhir_base_url="http://127.0.0.1:9/fhir", fhir_retries=0) as api:
        started = datetime.now(UTC)
        _outcome(await api.post("/patients/p1/predict"), 502)
        assert (datetime.now(UTC) - started).total_seconds() < 5


async def test_api_keys_guard_patient_routes(
    make_api: ApiFactory, loaded_fhir: LoadedServer
) -> None:
    patient = loaded_fhir.records[0].patient_id
    async with make_api(fhir_base_url=loaded_fhir.base_url, api_keys=["k-123"]) as api:
        _outcome(await api.post(f"/patients/{patient}/predict"), 401)
        _outcome(await api.post(f"/patients/{patient}/predict", headers={"X-API-Key": "nope"}), 401)
        ok = await api.post(f"/patients/{patient}/predict", headers={"X-API-Key": "k-123"})
        assert ok.status_code == 200
        assert (await api.get("/health/ready")).status_code == 200  # operations stay open


async def test_health_and_model_routes(api: httpx.AsyncClient) -> None:
    for path in ("/health/live", "/v2/health/live", "/health/ready", "/v2/health/ready"):
        assert (await api.get(path)).status_code == 200
    info = (await api.get("/model")).json()
    assert set(info["tasks"]) == SERVED
    assert "fluid_electrolyte" in info["not_served"]
    assert (await api.get("/model/card")).text.startswith("# ")
    attributes = (await api.get("/model/source-attributes")).json()
    assert "quantitative_performance" in attributes


async def test_a_corrupt_artifact_keeps_the_service_not_ready(
    make_api: ApiFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(MODEL, broken)
    with (broken / "vocab.json").open("a") as f:
        f.write(" ")
    async with make_api(model_path=broken, fhir_base_url="http://127.0.0.1:9/fhir") as api:
        ready = await api.get("/health/ready")
        assert ready.status_code == 503
        assert "vocab.json" in ready.json()["reason"]
        assert (await api.get("/health/live")).status_code == 200
        assert "not ready" in _outcome(await api.post("/patients/p1/predict"), 503)


async def test_forecast_steps_run_in_onnxruntime_only_when_told(
    make_api: ApiFactory, loaded_fhir: LoadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committed artifact has an exported step; with ``EHRMAMBA_ENGINE_STEP=onnxruntime``
    the forecast's one-token steps go through it, by default they do not, and the answers
    agree."""
    runs: list[int] = []
    real = OnnxStep.run

    def counted(self: OnnxStep, *inputs: Any) -> Any:
        runs.append(len(inputs[0]))
        return real(self, *inputs)

    monkeypatch.setattr(OnnxStep, "run", counted)
    patient = loaded_fhir.records[0].patient_id
    bodies = {}
    steps = {}
    for backend in ("onnxruntime", "pytorch"):
        runs.clear()
        chosen = {"engine_step": backend} if backend == "onnxruntime" else {}  # else default
        async with make_api(fhir_base_url=loaded_fhir.base_url, **chosen) as api:
            response = await api.post(f"/patients/{patient}/predict", params={"forecast": 3})
            assert response.status_code == 200, response.text
            bodies[backend] = response.json()
        steps[backend] = len(runs)
    # The task tokens ride in the scan; each forecast step but the last (whose state nothing
    # reads) is one onnxruntime run.
    assert steps["onnxruntime"] == 2
    assert steps["pytorch"] == 0
    onnx, torch_ = (bodies[b] for b in ("onnxruntime", "pytorch"))
    assert onnx["predictions"].keys() == torch_["predictions"].keys()
    for task, answer in onnx["predictions"].items():
        assert answer["probability"] == pytest.approx(
            torch_["predictions"][task]["probability"], abs=1e-4
        )
    assert [s["token"] for s in onnx["forecast"]] == [s["token"] for s in torch_["forecast"]]
