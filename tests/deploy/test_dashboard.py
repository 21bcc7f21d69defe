"""The Grafana dashboard asks only for metrics the service really serves.

Every PromQL expression in deploy/grafana/dashboards/ehrmamba.json is reduced to the metric
names it reads; each must belong to a family defined in service/metrics.py, and, after the
real app has answered predictions, a repeat, an unknown patient, a signed and an unsigned
CDS call, feedback and a failed audit write, each must have samples in ``/metrics``. A
renamed metric or a typo in a panel would otherwise only show as an empty graph.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any
from uuid import uuid4

import orjson
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.cds.client_token import ClientKey, sign_client_token
from tests.conftest import LoadedServer
from tests.service.conftest import ApiFactory
from tests.service.conftest import make_api as make_api  # the fixture, for this folder
from tests.support.cds import hook_body

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD: dict[str, Any] = json.loads((GRAFANA / "dashboards" / "ehrmamba.json").read_text())
ISSUER = "https://ehr.hospital.example"
BASE = "http://service"  # make_api's client base URL: the audience CDS tokens name

# What the dashboard must show (the operations guide promises these panels).
REQUIRED = {
    "ehrmamba_http_requests_total",
    "ehrmamba_http_request_duration_seconds_bucket",
    "ehrmamba_inference_stage_seconds_bucket",
    "ehrmamba_batch_size_bucket",
    "ehrmamba_queue_wait_seconds_bucket",
    "ehrmamba_queue_depth",
    "ehrmamba_cache_requests_total",
    "ehrmamba_fhir_request_duration_seconds_bucket",
    "ehrmamba_fhir_errors_total",
    "ehrmamba_prediction_score_bucket",
    "ehrmamba_jwt_rejections_total",
    "ehrmamba_cds_requests_total",
}

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_.:])\$?[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions or
    aggregations (followed by '('), label names (in matchers and by/without lists),
    durations, keywords, or Grafana variables."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word.startswith("$") or word.lower() in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def panels(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in node.get("panels", []):
        found.append(panel)
        found.extend(panels(panel))
    return found


def dashboard_metrics() -> set[str]:
    names: set[str] = set()
    for panel in panels(DASHBOARD):
        for target in panel.get("targets", []):
            names |= metric_names(target["expr"])
    for variable in DASHBOARD["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        names |= set(_LABEL_VALUES.findall(text))
    return names


def served_names() -> dict[str, str]:
    """Sample name -> family name, for every metric defined in service/metrics.py."""
    names = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = next(iter(value.describe()))
            for suffix in _SUFFIXES[family.type]:
                names[family.name + suffix] = family.name
    return names


def test_metric_names_are_read_off_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route!="/x{y}"}[5m])))'
        " / on(job) group_left(instance) sum without (le) (b_total offset 1h) > bool 0"
        ' and max(c{task=~"$task"}[$__rate_interval]) or vector(1)'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_the_dashboard_reads_only_service_metrics_from_the_provisioned_source() -> None:
    names = dashboard_metrics()
    unknown = sorted(names - set(served_names()))
    assert unknown == [], f"not defined in service/metrics.py: {unknown}"
    missing = sorted(REQUIRED - names)
    assert missing == [], f"the dashboard has no panel for {missing}"
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {source["uid"] for source in provisioned["datasources"]}
    for panel in panels(DASHBOARD):
        for holder in [panel, *panel.get("targets", [])]:
            if "datasource" in holder:
                assert holder["datasource"]["uid"] in uids, panel["title"]


async def test_every_dashboard_metric_has_samples_in_metrics(
    make_api: ApiFactory, loaded_fhir: LoadedServer, tmp_path: Path
) -> None:
    key = ClientKey.generate("ES384")
    jwks = tmp_path / "ehr-jwks.json"
    jwks.write_bytes(orjson.dumps(key.public_jwks()))
    store = tmp_path / "store.db"
    patient = loaded_fhir.records[-1].patient_id
    cds = "/cds-services/ehrmamba-patient-view"

    async with make_api(
        fhir_base_url=loaded_fhir.base_url,
        fhir_server_allow=[loaded_fhir.base_url],
        cds_issuers=[{"iss": ISSUER, "jwks_file": str(jwks)}],
        database_url=f"sqlite:///{store}",
    ) as api:

        def signed(path: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {sign_client_token(key, ISSUER, BASE + path)}"}

        for _ in range(2):  # cold, then from the cache
            answer = await api.post(f"/patients/{patient}/predict", params={"forecast": 2})
            assert answer.status_code == 200, answer.text
        unknown = await api.post(f"/patients/no-such-patient-{uuid4().hex}/predict")
        assert unknown.status_code == 404, unknown.text  # a FHIR 404: an upstream error

        body = hook_body(patient, {}, loaded_fhir.base_url)
        answered = await api.post(cds, json=body, headers=signed(cds))
        assert answered.status_code == 200, answered.text
        refused = await api.post(cds, json=body)  # no client JWT: rejected and counted
        assert refused.status_code == 401, refused.text
        item = {"card": str(uuid4()), "outcome": "overridden",
                "overrideReason": {"reason": {"code": "not-relevant",
                                              "system": "urn:ehrmamba:cds-override-reason"}},
                "outcomeTimestamp": "2026-11-27T10:00:00Z"}  # fmt: skip
        feedback = await api.post(
            f"{cds}/feedback", json={"feedback": [item]}, headers=signed(f"{cds}/feedback")
        )
        assert feedback.status_code == 200, feedback.text

        with sqlite3.connect(store) as database:  # the audit trail becomes unwritable
            database.execute("DROP TABLE audit_events")
        history = await api.get(f"/patients/{patient}/predictions")
        assert history.status_code == 503, history.text

        exposition = (await api.get("/metrics")).text

    sampled = {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    missing = sorted(dashboard_metrics() - sampled)
    assert missing == [], f"the dashboard reads metrics /metrics has no samples of: {missing}"
