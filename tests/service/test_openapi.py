"""The OpenAPI document covers every route, says what each does, and documents the
OperationOutcome errors clients must handle."""

from __future__ import annotations

from tests.service.conftest import ApiFactory

EXPECTED = {
    ("post", "/patients/{patient_id}/predict"): {401, 404, 422, 429, 502, 503, 504},
    ("get", "/patients/{patient_id}/predictions"): {401, 422, 503},
    ("get", "/patients/{patient_id}/view"): set(),  # an HTML page; its errors are too
    ("get", "/cds-services"): set(),
    ("post", "/cds-services/{service_id}"): {401, 403, 404, 412, 422, 502, 503, 504},
    ("post", "/cds-services/{service_id}/feedback"): {401, 404, 422, 503},
    ("get", "/metrics"): set(),
    ("get", "/health/ready"): set(),
    ("get", "/health/live"): set(),
    ("get", "/v2/health/ready"): set(),
    ("get", "/v2/health/live"): set(),
    ("get", "/model"): set(),
    ("get", "/model/card"): set(),
    ("get", "/model/source-attributes"): set(),
}


async def test_every_route_is_documented_with_its_errors(make_api: ApiFactory) -> None:
    async with make_api() as api:
        spec = (await api.get("/openapi.json")).json()
    operations = {
        (method, path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }
    assert set(operations) == set(EXPECTED)
    for key, statuses in EXPECTED.items():
        operation = operations[key]
        assert operation.get("description") or operation.get("summary"), key
        assert "200" in operation["responses"], key
        for status in statuses:
            response = operation["responses"].get(str(status))
            assert response is not None, (key, status)
            schema = response["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/OperationOutcome"), (key, status)
    predict = operations[("post", "/patients/{patient_id}/predict")]
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/Prediction")
    assert isinstance(spec["components"]["schemas"]["HookRequest"], dict)
