"""Metrics through the Flask test client (a private registry per app, no multiprocess directory)."""

from __future__ import annotations

import io

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import sample

EXPECTED_FAMILIES = {
    "petclf_requests",
    "petclf_request_duration_seconds",
    "petclf_queue_wait_seconds",
    "petclf_batch_size",
    "petclf_forward_seconds",
    "petclf_queue_depth",
    "petclf_rejected_requests",
    "petclf_predictions",
    "petclf_unknown",
    "petclf_model_info",
}


def test_exposition_has_every_family(client):
    client.get("/livez")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    families = {family.name for family in text_string_to_metric_families(response.get_data(as_text=True))}
    assert families >= EXPECTED_FAMILIES


def test_prediction_request_is_counted_everywhere(app_factory, cat_jpeg, class_names):
    app = app_factory()
    client = app.test_client()
    files = [(io.BytesIO(cat_jpeg), f"{i}.jpg") for i in range(3)]
    top = client.post("/predict/batch", data={"image": files}).get_json()["predictions"][0]["predicted_class"]
    client.post("/predict", data=b"junk", content_type="image/jpeg")
    assert sample(app, "petclf_requests_total", route="/predict/batch", status="200") == 1
    assert sample(app, "petclf_request_duration_seconds_count", route="/predict/batch", status="200") == 1
    assert sample(app, "petclf_requests_total", route="/predict", status="400") == 1
    assert sample(app, "petclf_rejected_requests_total", reason="invalid_image") == 1
    assert sample(app, "petclf_predictions_total", **{"class": top}) == 3
    assert sample(app, "petclf_queue_wait_seconds_count") == 3
    assert sample(app, "petclf_batch_size_sum") == 3
    assert sample(app, "petclf_forward_seconds_count") == sample(app, "petclf_batch_size_count") >= 1
    assert sample(app, "petclf_queue_depth") == 0
    version = client.get("/model").get_json()["version"]
    assert sample(app, "petclf_model_info", version=version, arch="resnet18", device="cpu") == 1


def test_unknown_routes_share_one_label(app_factory):
    app = app_factory()
    client = app.test_client()
    client.get("/a")
    client.get("/b")
    assert sample(app, "petclf_requests_total", route="unmatched", status="404") == 2
