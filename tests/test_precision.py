"""CPU precisions: native-bf16 detection, the int8 file (calibrate, store, reload) and each precision's agreement."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app import create_app, get_service
from app.config import ConfigError, load_settings
from models.bundle import add_runtimes, load_bundle, load_model
from models.loader import load_predictor
from models.quantize import (
    ENTRY,
    RECOMMENDED_AGREEMENT,
    Int8Network,
    QuantizationError,
    int8_path,
    int8_problem,
    load_int8,
    quantize,
    read_int8,
)
from models.runtime import cpu_bf16_problem
from models.training.agreement import batches, bundle_split, labelled
from models.training.evaluation import evaluate_bundle
from models.training.quantization import quantize_bundle
from tests.helpers import REPO_ROOT, legacy_bundle

NATIVE_BF16 = cpu_bf16_problem() is None
INT8 = {"PRECISION": "int8", "DEVICE": "cpu"}
NO_NATIVE_BF16 = f"this CPU has no native bf16, so bf16 is refused here and not measured: {cpu_bf16_problem()}"


pytestmark = pytest.mark.numerics  # int8 and bf16 agreement on the trained fixture model


@pytest.mark.parametrize(
    ("features", "native"),
    [
        ({"avx512_bf16": True}, True),
        ({"amx_bf16": True, "avx512_bf16": False}, True),
        ({"avx2": True, "avx512_f": True, "cpu_name": "AMD EPYC"}, False),
        ({}, False),
    ],
)
def test_cpu_bf16_detection(features, native):
    problem = cpu_bf16_problem(features)
    assert (problem is None) == native
    if not native:
        assert "avx512_bf16" in problem and "AMX" in problem and "fp32" in problem


def test_bf16_on_cpu_follows_native_support():
    if NATIVE_BF16:
        assert load_settings({"DEVICE": "cpu", "PRECISION": "bf16"}).precision == "bf16"
    else:
        with pytest.raises(ConfigError, match="PRECISION=bf16 with DEVICE=cpu: .*avx512_bf16"):
            load_settings({"DEVICE": "cpu", "PRECISION": "bf16"})


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor) and value.is_quantized:
            assert torch.equal(actual[name].int_repr(), value.int_repr()), name
            assert torch.equal(actual[name].dequantize(), value.dequantize()), name
        elif isinstance(value, torch.Tensor):
            assert torch.equal(actual[name], value), name


@pytest.fixture(scope="module")
def int8_run(trained_bundle_path, training_data, tmp_path_factory):
    """A copy of the trained fixture bundle quantized by the library the script calls (48 calibration images, all
    60 held-out images), carrying its int8 network as scripts/quantize.py leaves it."""
    bundle = tmp_path_factory.mktemp("int8") / "bundle.pt"
    shutil.copy(trained_bundle_path, bundle)
    report = quantize_bundle(bundle, training_data, 48, 60, batch_size=16, workers=0)
    return {**report, "bundle": bundle}


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load of quantized tensors
def test_int8_file_reloads_without_calibration_and_matches(int8_run, trained_bundle_path, training_data):
    bundle = load_bundle(int8_run["bundle"])  # torch.load(weights_only=True): plain entries, safe to load
    state = bundle.runtimes[ENTRY]
    assert state["bundle_hash"] == bundle.content_hash == load_bundle(trained_bundle_path).content_hash
    assert state["backend"] == "x86" and state["info"]["calibration"]["images"] == 48
    reloaded = load_int8(bundle)
    model, _ = load_model(trained_bundle_path)
    images = next(iter(batches([(str(p), 0) for p in sorted((training_data / "val").rglob("*.jpg"))[:8]],
                               bundle.preprocess, 8, 0)))  # fmt: skip
    calibrated = quantize(model, [images], bundle.preprocess["crop"])  # a fresh calibration differs...
    # ...but the reloaded network is the stored one, bit for bit: no recalibration happened.
    assert_same_state(reloaded.state_dict(), state["state_dict"])
    with torch.inference_mode():
        assert reloaded(images).shape == (8, 3)
        assert not torch.equal(reloaded(images), calibrated(images))


def test_each_precision_agrees_with_fp32(int8_run):
    agreement = int8_run["agreement"]
    assert {key: agreement["fp32"][key] for key in ("agreement", "images", "recommended")} == {
        "agreement": 1.0, "images": 60, "recommended": True}  # fmt: skip
    # A 3-epoch, 32-pixel resnet18: int8 flips a few near-ties; the 99% bar decides "recommended".
    assert agreement["int8"]["images"] == 60 and agreement["int8"]["agreement"] >= 0.9
    assert agreement["int8"]["recommended"] == (agreement["int8"]["agreement"] >= RECOMMENDED_AGREEMENT)
    if not NATIVE_BF16:
        assert "avx512_bf16" in agreement["bf16"]["skipped"]
        pytest.skip(NO_NATIVE_BF16)
    assert agreement["bf16"]["agreement"] >= 0.9


def test_a_missing_stale_or_foreign_int8_network_is_refused(int8_run, bundle_copy):
    with pytest.raises(QuantizationError, match="carries no int8 network; make it with: python scripts/quantize.py"):
        load_int8(load_bundle(bundle_copy))
    # Only a format-2 bundle can meet another bundle's int8 network: the file beside it.
    old = legacy_bundle(bundle_copy, bundle_copy)
    torch.save(load_bundle(int8_run["bundle"]).runtimes[ENTRY], int8_path(old))
    with pytest.raises(QuantizationError, match="was made from another bundle"):
        read_int8(load_bundle(old))
    torch.save({"format": {"name": "something-else"}}, int8_path(old))
    with pytest.raises(QuantizationError, match="is not an int8 network of this version"):
        read_int8(load_bundle(old))


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_the_report_measures_the_loaders_predictors(int8_run, training_data, tmp_path):
    # The recorded agreement is that of the predictors the loader builds (int8: the network the bundle carries,
    # read back) on the held-out images: the same figures come out of load_predictor and scripts/evaluate.py.
    bundle, recorded = load_bundle(int8_run["bundle"]), int8_run["agreement"]
    _, holdout, _ = bundle_split(bundle, training_data, 0, 60)
    images = [batch for batch, _ in labelled(holdout, bundle.preprocess, 16, 0)]
    served = {p: load_predictor(int8_run["bundle"], "cpu", p, "torch").predictor for p in ("fp32", "int8")}
    top1 = {p: torch.cat([predictor(batch).probs.argmax(1) for batch in images]) for p, predictor in served.items()}
    agreement = (top1["int8"] == top1["fp32"]).float().mean().item()
    assert recorded["int8"]["agreement"] == round(agreement, 4) and recorded["int8"]["images"] == len(holdout) == 60
    assert recorded["fp32"]["agreement"] == 1.0 and recorded["fp32"]["max_probability_difference"] == 0.0
    for precision, key in (("int8", "accuracy"), ("fp32", "fp32_accuracy")):
        report = evaluate_bundle(int8_run["bundle"], training_data, tmp_path / precision, 16, 0, "cpu", precision,
                                 backend="torch")  # fmt: skip
        assert report["images"] == 60 and round(report["accuracy"], 4) == recorded["int8"][key]


def test_quantize_script_writes_into_the_bundle(trained_bundle_path, training_data, tmp_path):
    bundle = tmp_path / "bundle.pt"
    bundle.write_bytes(trained_bundle_path.read_bytes())
    argv = ["--model", str(bundle), "--data-dir", str(training_data), "--calibration-images", "16"]
    argv += ["--holdout-images", "16", "--workers", "0"]
    result = subprocess.run(
        [sys.executable, "scripts/quantize.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["int8"] == f"{bundle}:torch/int8" and ENTRY in load_bundle(bundle).runtimes
    assert [path.name for path in tmp_path.iterdir()] == ["bundle.pt"]  # one file
    assert set(report["agreement"]) == {"fp32", "bf16", "int8"}
    bad = subprocess.run(
        [sys.executable, "scripts/quantize.py", "--model", str(bundle), "--data-dir", str(tmp_path / "nothing")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "error:" in bad.stderr


@pytest.fixture(scope="module")
def int8_bundle(int8_run) -> Path:
    """The trained bundle carrying its int8 network, as scripts/quantize.py leaves it."""
    return int8_run["bundle"]


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_int8_serves_the_stored_network_and_explains_in_float32(int8_bundle, int8_run, app_factory, training_data):
    fp32, int8 = app_factory(int8_bundle), app_factory(int8_bundle, PRECISION="int8")
    (member,) = int8.test_client().get("/model").get_json()["members"]
    assert member["int8"]["agreement"] == int8_run["agreement"]["int8"]  # what scripts/quantize.py measured
    assert member["int8"]["file"] == "bundle.pt:torch/int8" and member["int8"]["calibration"]["images"] == 48
    assert "int8" not in fp32.test_client().get("/model").get_json()["members"][0]
    served = get_service(int8).handler.predictor.members[0].model
    assert isinstance(served, Int8Network) and not any(p.is_floating_point() for p in served.backbone.parameters())
    photos = sorted((training_data / "val").rglob("*.jpg"))[:6]
    answers = []
    for app in (fp32, int8):
        files = [(io.BytesIO(path.read_bytes()), path.name) for path in photos]
        response = app.test_client().post("/predict/batch?top_k=1", data={"image": files})
        assert response.status_code == 200, response.get_json()
        answers.append([one["predicted_class"] for one in response.get_json()["predictions"]])
    assert sum(a == b for a, b in zip(*answers, strict=True)) >= 5  # int8 may flip a near-tie
    # /explain differentiates the float32 network (int8 kernels have no gradients), on the same pixels.
    explained = int8.test_client().post("/explain?format=json", data=photos[0].read_bytes(), content_type="image/jpeg")
    assert explained.status_code == 200 and explained.get_json()["explained_class"]


def test_int8_start_up_needs_a_current_int8_network(int8_bundle, bundle_copy, tiny_bundle_path, tmp_path):
    assert int8_problem(int8_bundle) is None
    missing = int8_problem(bundle_copy)
    assert f"{bundle_copy} carries no int8 network" in missing and "python scripts/quantize.py" in missing
    with pytest.raises(QuantizationError, match="make it with: python scripts/quantize.py --model"):
        create_app({"MODEL_PATH": str(bundle_copy), "PRECISION": "int8", "TORCH_THREADS": 1})
    legacy_bundle(bundle_copy, bundle_copy)  # format 2, with another bundle's int8 network beside it: stale
    torch.save(load_bundle(int8_bundle).runtimes[ENTRY], int8_path(bundle_copy))
    assert "was made from another bundle" in int8_problem(bundle_copy)
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--check-config", "-c", "gunicorn.conf.py", "app:create_app()"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MODEL_PATH": str(bundle_copy), **INT8, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode != 0 and "configuration error: PRECISION=int8:" in result.stderr
    assert "make it again with: python scripts/quantize.py" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_int8_below_the_recommended_agreement_is_served_with_a_warning(int8_bundle, app_factory, tmp_path, caplog):
    bundle = Path(shutil.copy(int8_bundle, tmp_path / "low.pt"))
    loaded = load_bundle(bundle)
    state = loaded.runtimes[ENTRY]
    state["info"]["agreement"]["int8"]["agreement"] = 0.9
    add_runtimes(bundle, loaded.content_hash, {ENTRY: state})
    with caplog.at_level(logging.WARNING, logger="app.inference"):
        app = app_factory(bundle, PRECISION="int8")
    assert app.test_client().get("/model").get_json()["members"][0]["int8"]["agreement"]["agreement"] == 0.9
    assert "top-1 agreement with fp32 90.00%" in caplog.text and "recommended: >= 99%" in caplog.text
