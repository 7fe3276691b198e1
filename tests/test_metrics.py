"""Metrics through the Flask test client (a private registry per app, no multiprocess directory)."""

from __future__ import annotations

import io

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import get_service
from models.bundle import save_bundle
from models.transforms import default_preprocess
from tests.conftest import TINY_IMAGE_SIZE
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
    "petclf_queue_capacity",
    "petclf_ood_expected_unknown_ratio",
    "petclf_class_baseline_ratio",
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


def test_rule_baselines_come_from_the_settings_and_the_bundle(app_factory, tmp_path, tiny_model, class_names):
    # What deploy/prometheus/rules.yml compares against: MAX_QUEUE, 1 - the detector's `keep`, the validation mix.
    val_counts = dict(zip(class_names, (10, 30, 60), strict=True))
    path = tmp_path / "fitted.pt"
    ood = {"score": "max-probability", "threshold": 0.4, "keep": 0.95}
    training = {"class_counts": {"train": dict.fromkeys(class_names, 1), "val": val_counts}}
    save_bundle(path, tiny_model, class_names, default_preprocess(TINY_IMAGE_SIZE), training=training, ood=ood)
    app = app_factory(path, MAX_QUEUE=17)
    assert sample(app, "petclf_queue_capacity") == 17
    assert sample(app, "petclf_ood_expected_unknown_ratio", score="max-probability") == pytest.approx(0.05)
    for name, count in val_counts.items():
        assert sample(app, "petclf_class_baseline_ratio", **{"class": name}) == pytest.approx(count / 100)


def test_no_baseline_without_a_detector_or_a_recorded_mix(app):
    # The tiny bundle has neither: the gauges stay empty (a 0 would make every unknown look like drift).
    exported = app.test_client().get("/metrics").get_data(as_text=True)
    assert "petclf_ood_expected_unknown_ratio{" not in exported
    assert "petclf_class_baseline_ratio{" not in exported
    assert sample(app, "petclf_queue_capacity") == get_service(app).settings.max_queue
