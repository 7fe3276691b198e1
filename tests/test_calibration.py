"""Temperature scaling and ECE: the maths on known numbers, and the fit on a real over-confident tiny model."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from models.bundle import load_bundle, save_bundle
from models.pet_classifier import PetClassifier
from models.training.calibration import (
    expected_calibration_error,
    fit_bundle,
    fit_temperature,
    kept_score,
    nll,
    reliability,
)
from models.training.data import ImageList, discover, make_loader
from models.training.evaluation import evaluate_bundle
from models.transforms import default_preprocess, eval_transform
from tests.helpers import REPO_ROOT


def test_ece_on_known_numbers():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 0, 1])
    # Bins: 0.9 -> two images, accuracy 0.5; 0.6 -> one, right; 0.8 -> one, right.
    expected = (2 * abs(0.5 - 0.9) + abs(1 - 0.6) + abs(1 - 0.8)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    rows = reliability(probs, labels)
    assert len(rows) == 15 and sum(r["count"] for r in rows) == 4
    assert next(r for r in rows if r["count"] == 2)["accuracy"] == 0.5


def test_fit_temperature_finds_the_nll_minimum():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (200,))
    logits = torch.randn(200, 4) * 2 + 3 * torch.nn.functional.one_hot(labels, 4)
    logits *= 4  # over-confident: the best temperature is well above 1
    fitted = fit_temperature(logits, labels)
    grid = [math.exp(x / 100) for x in range(-300, 300)]
    best = min(grid, key=lambda t: nll(logits, labels, t))
    assert fitted == pytest.approx(best, rel=0.02) and fitted > 2
    assert nll(logits, labels, fitted) < nll(logits, labels)


def test_a_validation_set_ranked_all_right_keeps_temperature_1():
    # No finite NLL minimum exists (it falls as T -> 0), so there is nothing to fit; one mistake makes one.
    labels = torch.tensor([0, 1, 2, 0])
    logits = torch.nn.functional.one_hot(labels, 3).float() * 2
    assert fit_temperature(logits, labels) == 1.0
    logits[0] = torch.tensor([0.0, 1.0, 0.0])
    assert fit_temperature(logits, labels) != 1.0


@pytest.mark.slow
@pytest.mark.numerics
def test_calibration_lowers_ece_of_an_over_confident_tiny_model(tmp_path, demo_data, class_names):
    torch.manual_seed(0)
    model = PetClassifier(len(class_names), arch="resnet18", head={"hidden": 0}).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(50)  # the same ranking, wildly over-confident probabilities
    path = tmp_path / "overconfident.pt"
    preprocess = default_preprocess(64)
    before = save_bundle(path, model, class_names, preprocess)
    # Fit on the training images, measure on the validation images the fit never saw.
    split = discover(demo_data)
    transform = eval_transform(preprocess)
    fit_loader = make_loader(ImageList(split.train, transform, min_size=preprocess["resize"]), 12, 0)
    calibration = fit_bundle(path, fit_loader, None, torch.device("cpu"), score="energy")
    assert calibration["temperature"] > 5 and calibration["ece_after"] < calibration["ece_before"]
    bundle = load_bundle(path)
    assert bundle.version != before and bundle.temperature == calibration["temperature"]
    assert bundle.metrics["ece_after"] == calibration["ece_after"] and bundle.ood["score"] == "energy"
    report = evaluate_bundle(path, demo_data, tmp_path / "report", workers=0)
    held_out = report["calibration"]
    assert held_out["ece_after"] < held_out["ece_before"] - 0.2, held_out
    assert held_out["nll_after"] < held_out["nll_before"]


def test_auto_keeps_the_bundles_score_or_follows_its_training(tiny_bundle_path):
    bundle = load_bundle(tiny_bundle_path)
    assert bundle.ood is None and not bundle.training.get("outlier_exposure")
    assert kept_score(bundle) == "energy"
    exposed = dataclasses.replace(bundle, training={**bundle.training, "outlier_exposure": 1.0})
    assert kept_score(exposed) == "max-probability"
    fitted = dataclasses.replace(exposed, ood={"score": "mahalanobis"})
    assert kept_score(fitted) == "mahalanobis"


def test_the_script_calibrates_an_existing_bundle(tmp_path, tiny_bundle_path, demo_data):
    out = tmp_path / "calibrated.pt"
    argv = ["--model", str(tiny_bundle_path), "--data-dir", str(demo_data), "--output", str(out)]
    result = subprocess.run(
        [sys.executable, "scripts/calibrate.py", *argv, "--ood-score", "max-probability"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "on 12 validation images" in result.stdout and str(out) in result.stdout
    bundle = load_bundle(out)
    assert bundle.ood["score"] == "max-probability" and "ece_after" in bundle.calibration
    assert load_bundle(tiny_bundle_path).ood is None, "the input bundle is left as it was"
    # Re-calibrating with the default (--ood-score auto) keeps the bundle's detector instead of switching it.
    again = tmp_path / "again.pt"
    rerun = subprocess.run(
        [sys.executable, "scripts/calibrate.py", "--model", str(out), *argv[2:4], "--output", str(again)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "unknown-input score max-probability" in rerun.stdout
    assert load_bundle(again).ood["score"] == "max-probability"
    wrong = subprocess.run(
        [sys.executable, "scripts/calibrate.py", *argv[:2], "--data-dir", str(demo_data / "val" / "circle")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert wrong.returncode != 0 and "error:" in wrong.stderr and "Traceback" not in wrong.stderr
