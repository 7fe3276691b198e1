"""The bundle contract: round trip, plain torch.load, and every refusal."""

from __future__ import annotations

import pytest
import torch

from models.bundle import FORMAT_NAME, BundleError, atomic_save, content_hash, load_bundle, load_model, save_bundle
from models.pet_classifier import PetClassifier
from models.transforms import default_preprocess


def test_round_trip_gives_identical_outputs(tiny_model, tiny_bundle_path):
    loaded, bundle = load_model(tiny_bundle_path)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(tiny_model(x), loaded(x))
    assert not loaded.training
    assert bundle.arch == "resnet18"
    assert bundle.class_names == ["circle", "square", "triangle"]


def test_plain_weights_only_torch_load_reads_a_bundle(tiny_bundle_path):
    raw = torch.load(tiny_bundle_path, map_location="cpu", weights_only=True)
    assert raw["format"] == {"name": FORMAT_NAME, "version": 3} and raw["runtimes"] == {}  # training adds them
    assert {"arch", "head", "class_names", "preprocess", "state_dict", "metrics", "training"} <= set(raw)
    assert raw["calibration"] == {"temperature": 1.0} and raw["ood"] is None  # saved without fitting
    assert raw["preprocess"] == default_preprocess(64)
    assert raw["metrics"] == {"val_acc": 0.0}


def test_version_is_a_content_hash(tiny_bundle_path, tiny_model, class_names, tmp_path):
    bundle = load_bundle(tiny_bundle_path)
    assert bundle.version == f"sha256:{bundle.content_hash[:12]}"
    again = save_bundle(tmp_path / "again.pt", tiny_model, class_names, default_preprocess(64))
    assert again == bundle.version, "same content, same version"
    changed = PetClassifier(3, arch="resnet18")
    other = save_bundle(tmp_path / "other.pt", changed, class_names, default_preprocess(64))
    assert other != bundle.version


def test_training_metadata_is_stored_as_plain_types(tmp_path, tiny_model, class_names):
    path = tmp_path / "meta.pt"
    save_bundle(path, tiny_model, class_names, default_preprocess(64), training={"data_dir": tmp_path, "lr": 0.1})
    assert load_bundle(path).training == {"data_dir": str(tmp_path), "lr": 0.1}


def test_save_refuses_a_class_list_that_does_not_match(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        save_bundle(tmp_path / "x.pt", tiny_model, ["a", "b"], default_preprocess(64))


def _rewrite(path, **changes):
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    torch.save(raw, path)


def _rehash(path):
    raw = torch.load(path, map_location="cpu", weights_only=True)
    fields = (raw["arch"], raw["head"], raw["class_names"], raw["preprocess"], raw["state_dict"])
    answers = None if raw["format"]["version"] == 1 else {"calibration": raw["calibration"], "ood": raw["ood"]}
    raw["content_hash"] = content_hash(*fields, answers)
    torch.save(raw, path)


@pytest.mark.parametrize(
    ("changes", "rehash", "message"),
    [
        ({"format": {"name": FORMAT_NAME, "version": 99}}, False, "format version 99; this code reads 1, 2"),
        ({"format": {"name": "something-else", "version": 2}}, False, "format name 'something-else'"),
        ({"class_names": None}, False, r"missing required keys \['class_names'\]"),
        ({"state_dict": None}, False, r"missing required keys \['state_dict'\]"),
        ({"class_names": ["a", "b", "c", "d"]}, True, "4 class names but the head has 3 outputs"),
        ({"class_names": ["a", "a", "b"]}, True, "duplicates"),
        ({"preprocess": {"resize": 8, "crop": 64}}, True, "preprocess is missing"),
        ({"class_names": ["x", "y", "z"]}, False, "content hash mismatch"),
        ({"calibration": {"temperature": 0.5}}, False, "content hash mismatch"),  # the temperature is hashed
        ({"calibration": {"temperature": 0.0}}, True, "temperature must be a positive number, got 0.0"),
        ({"ood": {"score": "vibes", "threshold": 1.0}}, True, "ood score 'vibes' is not one of mahalanobis"),
        ({"ood": {"score": "mahalanobis", "threshold": 1.0}}, True, r"needs tensors \['means', 'precision'\]"),
    ],
)
def test_load_refuses_bad_bundles_naming_file_and_problem(bundle_copy, changes, rehash, message):
    _rewrite(bundle_copy, **changes)
    if rehash:
        _rehash(bundle_copy)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(bundle_copy)
    assert str(bundle_copy) in str(info.value)


def test_version_1_bundles_load_uncalibrated_without_a_detector(bundle_copy, tiny_model):
    raw = torch.load(bundle_copy, map_location="cpu", weights_only=True)
    del raw["calibration"], raw["ood"]
    raw["format"]["version"] = 1
    raw["content_hash"] = content_hash(
        raw["arch"], raw["head"], raw["class_names"], raw["preprocess"], raw["state_dict"]
    )
    torch.save(raw, bundle_copy)
    bundle = load_bundle(bundle_copy)
    assert bundle.temperature == 1.0 and bundle.calibration == {"temperature": 1.0} and bundle.ood is None
    assert bundle.version == f"sha256:{raw['content_hash'][:12]}", "a version-1 bundle keeps its version"


def test_calibration_and_detector_change_the_version(tmp_path, tiny_model, class_names, tiny_bundle_path):
    plain = load_bundle(tiny_bundle_path).version
    calibrated = save_bundle(
        tmp_path / "t.pt", tiny_model, class_names, default_preprocess(64), calibration={"temperature": 2.0}
    )
    ood = {"score": "energy", "threshold": -1.0, "scale": 0.5}
    detected = save_bundle(tmp_path / "o.pt", tiny_model, class_names, default_preprocess(64), ood=ood)
    assert len({plain, calibrated, detected}) == 3
    assert load_bundle(tmp_path / "t.pt").temperature == 2.0
    assert load_bundle(tmp_path / "o.pt").ood == ood


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(BundleError, match=r"does not exist \(train one with scripts/train.py\)"):
        load_bundle(tmp_path / "nope.pt")


def test_bare_state_dict_is_not_a_bundle(tmp_path, tiny_model):
    path = tmp_path / "weights.pt"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(BundleError, match="not a model bundle: no 'format' entry"):
        load_bundle(path)


def test_non_torch_file_is_not_a_bundle(tmp_path):
    path = tmp_path / "cat.pt"
    path.write_bytes(b"\xff\xd8\xff\xe0 definitely a jpeg")
    with pytest.raises(BundleError, match="not a model bundle: torch.load failed"):
        load_bundle(path)


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": {"name": FORMAT_NAME, "version": 2}, "payload": PetClassifier}, path)
    with pytest.raises(BundleError, match="torch.load failed"):
        load_bundle(path)


def test_a_failed_save_leaves_the_previous_file_intact(bundle_copy):
    before = bundle_copy.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        atomic_save({"not serialisable": lambda: 0}, bundle_copy)
    assert bundle_copy.read_bytes() == before
    assert [p.name for p in bundle_copy.parent.iterdir()] == [bundle_copy.name], "no temporary file left behind"
