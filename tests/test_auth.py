"""Optional API keys: settings, the 401 answer, public and protected endpoints, the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

import pytest
from openapi_spec_validator import validate

from app import get_service
from app.auth import bearer_token, key_matches, public_endpoints
from app.config import ConfigError, load_settings

KEY = "0123456789abcdef-key-one"
OTHER = "fedcba9876543210-key-two"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_from_a_list_or_a_file(tmp_path):
    assert load_settings({"API_KEYS": f" {KEY} ,{OTHER}"}).api_keys == (KEY, OTHER)
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated 2026-01\n{KEY}\n\n{OTHER}\n")
    assert load_settings({"API_KEYS": str(keys)}).api_keys == (KEY, OTHER)
    assert load_settings({}).api_keys == () and load_settings({}).metrics_public is True
    assert KEY not in repr(load_settings({"API_KEYS": KEY})), "settings never print the keys"


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("short", "at least 16"),
        (f"{KEY},has space in it here", "key 2 of 2 is invalid"),
        ("/no/such/keys-file", "cannot be read"),
        ("./empty-keys", "holds no keys"),
    ],
)
def test_bad_keys_are_refused_without_being_printed(value, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-keys").write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as error:
        load_settings({"API_KEYS": value})
    assert "API_KEYS" in str(error.value) and hint in str(error.value)
    assert "short" not in str(error.value) and "has space" not in str(error.value)


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_metrics_public_is_a_flag(value):
    with pytest.raises(ConfigError, match="METRICS_PUBLIC='.*' is invalid: valid choices are true"):
        load_settings({"METRICS_PUBLIC": value})


def test_token_parsing_and_constant_time_match():
    assert bearer_token(f"Bearer {KEY}") == KEY.encode()
    assert bearer_token(f"bearer   {KEY} ") == KEY.encode()
    assert bearer_token(f"Basic {KEY}") is None and bearer_token("Bearer ") is None and bearer_token("") is None
    keys = (KEY.encode(), OTHER.encode())
    assert key_matches(OTHER.encode(), keys) and not key_matches(KEY.encode()[:-1], keys)


@pytest.fixture
def keyed(app_factory):
    return app_factory(API_KEYS=f"{KEY},{OTHER}")


@pytest.mark.parametrize(
    ("headers", "message", "challenge"),
    [
        ({}, "needs the header", 'Bearer realm="pet-classifier"'),
        (bearer("wrong-key-0123456789"), "not valid", 'Bearer realm="pet-classifier", error="invalid_token"'),
        ({"Authorization": f"Basic {KEY}"}, "needs the header", 'Bearer realm="pet-classifier"'),
    ],
)
def test_prediction_needs_a_valid_key(keyed, cat_jpeg, headers, message, challenge):
    response = keyed.test_client().post("/predict", data=cat_jpeg, content_type="image/jpeg", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert message in response.get_json()["error"]["message"]
    assert response.headers["WWW-Authenticate"] == challenge


def test_any_configured_key_opens_protected_routes(keyed, cat_jpeg):
    client = keyed.test_client()
    for key in (KEY, OTHER):
        assert client.post("/predict", data=cat_jpeg, content_type="image/jpeg", headers=bearer(key)).status_code == 200
    assert client.get("/model", headers=bearer(KEY)).status_code == 200
    assert client.get("/model").status_code == 401


def test_probes_and_docs_stay_open_and_metrics_follow_metrics_public(keyed, app_factory):
    client = keyed.test_client()
    for path in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/openapi.json", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert client.get("/model").status_code == 401
    assert 'petclf_rejected_requests_total{reason="unauthorized"} 1.0' in client.get("/metrics").get_data(as_text=True)
    closed = app_factory(API_KEYS=KEY, METRICS_PUBLIC="false").test_client()
    assert closed.get("/metrics").status_code == 401
    assert closed.get("/metrics", headers=bearer(KEY)).status_code == 200


def test_a_route_added_later_is_protected_by_default(app_factory):
    app = app_factory(API_KEYS=KEY)
    app.add_url_rule("/v2/new-thing", "v2_new_thing", lambda: "secret")
    client = app.test_client()
    assert client.get("/v2/new-thing").status_code == 401
    assert client.get("/v2/new-thing", headers=bearer(KEY)).get_data(as_text=True) == "secret"


def test_without_keys_everything_is_open(client, cat_jpeg):
    assert client.post("/predict", data=cat_jpeg, content_type="image/jpeg").status_code == 200
    assert "securitySchemes" not in client.get("/openapi.json").get_json().get("components", {})


def test_openapi_documents_the_bearer_scheme(keyed):
    spec = keyed.test_client().get("/openapi.json").get_json()
    validate(spec)
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/predict"]["post"]["security"] == [{"bearerAuth": []}]
    assert "401" in spec["paths"]["/predict"]["post"]["responses"]
    assert "security" not in spec["paths"]["/readyz"]["get"]
    assert "security" not in spec["paths"]["/metrics"]["get"]


def test_docs_list_every_public_route(keyed):
    # docs/security.md is where users learn what answers without a key; a route made public must be listed there.
    documented = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    public = public_endpoints(get_service(keyed).settings)
    rules = {rule.rule for rule in keyed.url_map.iter_rules() if rule.endpoint in public and "<" not in rule.rule}
    assert rules and all(f"`GET {rule}`" in documented for rule in rules), rules
