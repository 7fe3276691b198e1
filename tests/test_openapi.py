"""The OpenAPI document: a valid OpenAPI 3 spec, and the live app conforms to it under generated inputs."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import positive_data_acceptance


def test_document_is_valid_openapi_3(client):
    spec = client.get("/openapi.json").get_json()
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert {"/predict", "/predict/batch", "/model", "/livez", "/readyz", "/metrics"} <= set(spec["paths"])


def _predict_requests(client) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    lines = [line for line in text.splitlines() if line.startswith('petclf_requests_total{route="/predict"')]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_app_conforms_to_its_schema_and_never_errors(app, client):
    # Generated requests (schemathesis) for every operation: no 5xx, and every answer matches its schema.
    # Random bytes are schema-valid "binary" but not images, so a 4xx for them is right, not a failure.
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    before = _predict_requests(client)
    assert len(operations) >= 6

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()
    assert _predict_requests(client) - before >= 10, "the generated requests reached the app"
