"""Routes through the Flask test client, on real tiny bundles."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest
import torch

from app import create_app, get_service
from app.errors import ApiError
from app.inference import Handler
from models.bundle import BundleError, load_model, save_bundle
from models.pet_classifier import PetClassifier
from models.transforms import default_preprocess
from tests.helpers import PHOTO_NAMES, PHOTOS, reference_probabilities


def check_prediction(result: dict, class_names: list[str], top_k: int = 3) -> None:
    probs = result["all_probabilities"]
    assert list(probs) == class_names
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result["predicted_class"] == max(probs, key=probs.get)
    assert result["confidence"] == probs[result["predicted_class"]]
    assert [entry["label"] for entry in result["top_k"]] == sorted(probs, key=probs.get, reverse=True)[:top_k]
    assert result["model_version"].startswith("sha256:")
    assert result["unknown"] is False and result["ood_score"] is None  # the tiny bundle has no detector


@pytest.mark.parametrize("form", ["multipart", "raw", "base64", "data-url"])
def test_predict_input_forms_agree(client, cat_jpeg, class_names, tiny_bundle_path, form):
    encoded = base64.b64encode(cat_jpeg).decode()
    kwargs = {
        "multipart": {"data": {"image": (io.BytesIO(cat_jpeg), "cat.jpg")}},
        "raw": {"data": cat_jpeg, "content_type": "image/jpeg"},
        "base64": {"json": {"image": encoded}},
        "data-url": {"json": {"image": f"data:image/jpeg;base64,{encoded}"}},
    }[form]
    response = client.post("/predict", **kwargs)
    assert response.status_code == 200, response.get_json()
    result = response.get_json()
    check_prediction(result, class_names)
    expected = reference_probabilities(tiny_bundle_path, cat_jpeg)
    assert list(result["all_probabilities"].values()) == pytest.approx(expected, abs=1e-4)


def test_query_options(client, cat_jpeg):
    result = client.post("/predict?top_k=1&include_probabilities=false", data=cat_jpeg, content_type="image/png")
    body = result.get_json()
    assert "all_probabilities" not in body
    assert [entry["label"] for entry in body["top_k"]] == [body["predicted_class"]]


def test_default_top_k_is_capped_at_class_count(client, cat_jpeg, class_names):
    body = client.post("/predict", data=cat_jpeg, content_type="image/jpeg").get_json()
    assert len(body["top_k"]) == min(5, len(class_names))


def test_batch_answers_in_order_and_matches_single(client, class_names):
    photos = [(PHOTOS / f"{name}.jpg").read_bytes() for name in PHOTO_NAMES]
    files = [(io.BytesIO(data), f"{i}.jpg") for i, data in enumerate(photos)]
    response = client.post("/predict/batch?top_k=2", data={"image": files})
    assert response.status_code == 200, response.get_json()
    batch = response.get_json()["predictions"]
    assert len(batch) == len(photos)
    for data, result in zip(photos, batch, strict=True):
        check_prediction(result, class_names, top_k=2)
        single = client.post("/predict", data=data, content_type="image/jpeg").get_json()
        assert list(result["all_probabilities"].values()) == pytest.approx(
            list(single["all_probabilities"].values()), abs=1e-4
        )


def test_model_info(client, class_names, tiny_bundle_path):
    info = client.get("/model").get_json()
    assert info["name"] == "pet-classifier" and info["class_names"] == class_names
    assert info["arch"] == "resnet18" and info["num_classes"] == len(class_names)
    assert info["preprocess"]["crop"] == 64
    assert info["device"] == "cpu" and info["precision"] == "fp32" and info["ready"] is True
    assert info["metrics"] == {"val_acc": 0.0}
    assert info["batching"]["max_batch_files"] == 4
    assert info["version"] == load_model(tiny_bundle_path)[1].version
    assert info["calibration"] == {"temperature": 1.0} and info["ood"] is None
    assert [m["version"] for m in info["members"]] == [info["version"]] and info["explain_concurrency"] == 1


def test_tta_flip_averages_the_image_and_its_mirror(client, cat_jpeg, tiny_bundle_path):
    plain = client.post("/predict", data=cat_jpeg, content_type="image/jpeg").get_json()
    flipped = client.post("/predict?tta=flip", data=cat_jpeg, content_type="image/jpeg").get_json()
    expected = reference_probabilities(tiny_bundle_path, cat_jpeg, flip=True)
    assert list(flipped["all_probabilities"].values()) == pytest.approx(expected, abs=1e-4)
    assert flipped["all_probabilities"] != plain["all_probabilities"]
    none = client.post("/predict?tta=none", data=cat_jpeg, content_type="image/jpeg").get_json()
    assert none["all_probabilities"] == plain["all_probabilities"]


@pytest.fixture
def calibrated_bundle(tmp_path, class_names) -> Path:
    """Another tiny model, calibrated with temperature 2 and with an energy-score detector."""
    torch.manual_seed(5)
    path = tmp_path / "calibrated.pt"
    ood = {"score": "energy", "threshold": -1.0, "scale": 0.5}
    model = PetClassifier(len(class_names), arch="resnet18").eval()
    save_bundle(path, model, class_names, default_preprocess(64), calibration={"temperature": 2.0}, ood=ood)
    return path


def test_an_ensemble_serves_the_average_of_its_calibrated_members(
    app_factory, tiny_bundle_path, calibrated_bundle, cat_jpeg
):
    client = app_factory(f"{tiny_bundle_path},{calibrated_bundle}").test_client()
    result = client.post("/predict", data=cat_jpeg, content_type="image/jpeg").get_json()
    members = [reference_probabilities(path, cat_jpeg) for path in (tiny_bundle_path, calibrated_bundle)]
    assert list(result["all_probabilities"].values()) == pytest.approx(
        [(a + b) / 2 for a, b in zip(*members, strict=True)], abs=1e-4
    )
    info = client.get("/model").get_json()
    versions = [load_model(path)[1].version for path in (tiny_bundle_path, calibrated_bundle)]
    assert [m["version"] for m in info["members"]] == versions and info["version"] not in versions
    assert info["arch"] == "ensemble(resnet18,resnet18)" and result["model_version"] == info["version"]
    assert info["ood"] is None and result["unknown"] is False  # one member has no detector


def test_a_calibrated_bundle_reports_its_score(app_factory, calibrated_bundle, cat_jpeg):
    client = app_factory(calibrated_bundle).test_client()
    result = client.post("/predict", data=cat_jpeg, content_type="image/jpeg").get_json()
    expected = reference_probabilities(calibrated_bundle, cat_jpeg)
    assert list(result["all_probabilities"].values()) == pytest.approx(expected, abs=1e-4)
    assert isinstance(result["ood_score"], float) and result["unknown"] is (result["ood_score"] > -1.0)
    info = client.get("/model").get_json()
    assert info["calibration"] == {"temperature": 2.0}
    assert (
        info["ood"]["score"] == "energy" and info["ood"]["threshold"] == -1.0 and info["ood"]["direction"] == "higher"
    )


def test_ensemble_members_must_agree(tmp_path, tiny_bundle_path, tiny_model):
    other = tmp_path / "other.pt"
    save_bundle(other, tiny_model, ["cat", "dog", "fox"], default_preprocess(64))
    with pytest.raises(BundleError, match="ensemble members disagree on class_names"):
        create_app({"MODEL_PATH": f"{tiny_bundle_path},{other}"})


def test_health(client):
    assert client.get("/livez").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ok", "reasons": []}


def test_readyz_reports_draining_but_predictions_continue(app_factory, cat_jpeg):
    app = app_factory()
    get_service(app).drain()
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["reasons"] == ["worker is draining (shutting down)"]
    assert app.test_client().post("/predict", data=cat_jpeg, content_type="image/jpeg").status_code == 200


def test_dead_batcher_makes_readyz_fail(app_factory, cat_jpeg):
    app = app_factory()
    get_service(app).batcher.stop()
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 503 and "batcher" in response.get_json()["reasons"][0]
    predict = client.post("/predict", data=cat_jpeg, content_type="image/jpeg")
    assert predict.status_code == 503 and predict.headers["Retry-After"]
    assert predict.get_json()["error"]["code"] == "not_ready"


def test_create_app_returns_a_warm_app(tiny_bundle_path, cat_jpeg):
    """No background warm-up: the app is ready the moment create_app returns (a worker accepts only then)."""
    app = create_app({"MODEL_PATH": str(tiny_bundle_path), "TORCH_THREADS": 1})
    try:
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        assert client.get("/model").get_json()["ready"] is True
        assert client.post("/predict", data=cat_jpeg, content_type="image/jpeg").status_code == 200
    finally:
        get_service(app).stop()


def test_a_failing_warm_up_stops_start_up(tiny_bundle_path, monkeypatch):
    def broken(self, batch_sizes):
        raise RuntimeError("warm-up exploded")

    monkeypatch.setattr(Handler, "warmup", broken)
    with pytest.raises(RuntimeError, match="warm-up exploded"):
        create_app({"MODEL_PATH": str(tiny_bundle_path), "TORCH_THREADS": 1})


def test_request_timeout_counts_from_arrival(app, cat_jpeg):
    """A request that waited for a thread past REQUEST_TIMEOUT_S is answered 504 at once, computing nothing."""
    service = get_service(app)
    stale = time.monotonic() - service.settings.request_timeout_s - 1
    with pytest.raises(ApiError) as error:
        service.predict([cat_jpeg], top_k=1, arrived=stale)
    assert error.value.code == "timeout"
    assert service.predict([cat_jpeg], top_k=1, arrived=time.monotonic())[0]["predicted_class"]


def test_unloadable_model_stops_start_up(tiny_bundle_path):
    with pytest.raises(BundleError, match="does not exist"):
        create_app({"MODEL_PATH": str(tiny_bundle_path) + ".missing"})


def test_timeout_gives_504(app_factory, cat_jpeg):
    # Another image is being decoded, so the batcher waits up to 5 s for a fuller batch; the request gives up after
    # 0.2 s and its item is skipped.
    app = app_factory(MAX_BATCH_SIZE=8, MAX_BATCH_WAIT_MS=5000, REQUEST_TIMEOUT_S=0.2)
    with get_service(app).batcher.preparing(1):
        response = app.test_client().post("/predict", data=cat_jpeg, content_type="image/jpeg")
    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "timeout"


def test_full_queue_gives_503_with_retry_after(app_factory, cat_jpeg):
    app = app_factory(MAX_BATCH_SIZE=8, MAX_BATCH_WAIT_MS=5000, MAX_QUEUE=1, REQUEST_TIMEOUT_S=1)
    files = [(io.BytesIO(cat_jpeg), f"{i}.jpg") for i in range(2)]
    response = app.test_client().post("/predict/batch", data={"image": files})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.get_json()["error"]["code"] == "queue_full"


def test_unexpected_error_is_500_without_traceback(app_factory, cat_jpeg):
    app = app_factory()
    service = get_service(app)
    service.handler.preprocess = lambda data, tta: 1 / 0  # a bug, not a bad input
    response = app.test_client().post("/predict", data=cat_jpeg, content_type="image/jpeg")
    assert response.status_code == 500
    assert response.get_json() == {"error": {"code": "internal_error", "message": "internal server error"}}
