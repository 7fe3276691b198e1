"""Marshmallow schemas and the OpenAPI document generated from them."""

from __future__ import annotations

import pytest
from marshmallow import ValidationError

from app.openapi import build_spec
from app.routes import ExplainQuerySchema, PredictQuerySchema
from app.schemas import ErrorSchema, PredictionSchema


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({}, {"top_k": 3, "include_probabilities": True}),
        ({"top_k": "2"}, {"top_k": 2, "include_probabilities": True}),
        ({"include_probabilities": "false"}, {"top_k": 3, "include_probabilities": False}),
        ({"include_probabilities": "0", "unknown": "ignored"}, {"top_k": 3, "include_probabilities": False}),
        ({"tta": "flip"}, {"top_k": 3, "include_probabilities": True, "tta": "flip"}),
    ],
)
def test_query_defaults_and_parsing(args, expected):
    assert PredictQuerySchema(num_classes=3).load(args) == {"tta": "none", **expected}


def test_explain_query():
    schema = ExplainQuerySchema(num_classes=3, class_names=["a", "b", "c"])
    assert schema.load({}) == {"top_k": 3, "class_": None, "format": "png"}
    assert schema.load({"class": "b", "format": "json", "tta": "ignored"})["class_"] == "b"
    with pytest.raises(ValidationError) as error:
        schema.load({"class": "z"})
    assert list(error.value.messages) == ["class"]


def test_default_top_k_is_five_with_many_classes():
    assert PredictQuerySchema(num_classes=37).load({})["top_k"] == 5


@pytest.mark.parametrize("top_k", ["0", "-1", "4", "x", "1.5"])
def test_top_k_out_of_range(top_k):
    with pytest.raises(ValidationError) as error:
        PredictQuerySchema(num_classes=3).load({"top_k": top_k})
    assert list(error.value.messages) == ["top_k"]


def test_prediction_dump_keeps_only_declared_fields():
    result = {
        "predicted_class": "cat",
        "confidence": 0.9,
        "all_probabilities": {"cat": 0.9, "dog": 0.1},
        "top_k": [{"label": "cat", "probability": 0.9}],
        "model_version": "sha256:abc",
        "internal": "not exposed",
    }
    dumped = PredictionSchema().dump(result)
    assert "internal" not in dumped and dumped["all_probabilities"] == {"cat": 0.9, "dog": 0.1}


def test_error_schema_uses_the_fields_key():
    dumped = ErrorSchema().dump({"error": {"code": "x", "message": "y", "fields_": {"top_k": ["bad"]}}})
    assert dumped == {"error": {"code": "x", "message": "y", "fields": {"top_k": ["bad"]}}}


def test_openapi_document():
    spec = build_spec("sha256:abc")
    assert spec["openapi"].startswith("3.")
    paths = {"/predict", "/predict/batch", "/explain", "/model", "/livez", "/readyz", "/metrics", "/openapi.json"}
    assert paths <= set(spec["paths"])
    predict = spec["paths"]["/predict"]["post"]
    assert {p["name"] for p in predict["parameters"]} == {"top_k", "include_probabilities", "tta"}
    explain = spec["paths"]["/explain"]["post"]
    assert {p["name"] for p in explain["parameters"]} == {"top_k", "class", "format"}
    assert set(explain["responses"]["200"]["content"]) == {"image/png", "application/json"}
    assert {"400", "501", "503"} <= set(explain["responses"])
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/json"}
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    prediction = spec["components"]["schemas"]["Prediction"]
    assert {
        "predicted_class",
        "confidence",
        "all_probabilities",
        "top_k",
        "unknown",
        "ood_score",
        "model_version",
    } <= set(prediction["properties"])
    assert {"calibration", "ood", "members"} <= set(spec["components"]["schemas"]["ModelInfo"]["properties"])
    assert "fields" in spec["components"]["schemas"]["ErrorBody"]["properties"]


def test_openapi_route_serves_the_document(client):
    document = client.get("/openapi.json").get_json()
    assert document["info"]["version"] == client.get("/model").get_json()["version"]
