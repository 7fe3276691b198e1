"""Offline evaluation: the report agrees with training's own validation, its files are written, the CLI runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from models.bundle import load_bundle, save_bundle
from models.ensemble import load_ensemble
from models.pet_classifier import PetClassifier
from models.training.evaluation import evaluate_bundle
from models.transforms import default_preprocess
from tests.helpers import REPO_ROOT
from tests.numerics import most_flagged

pytestmark = [pytest.mark.slow, pytest.mark.numerics]


def test_evaluate_writes_report_and_confusion_png(tmp_path, trained_bundle_path, training_data, class_names):
    out = tmp_path / "report"
    report = evaluate_bundle(trained_bundle_path, training_data, out, workers=0)
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == pytest.approx(report["accuracy"])
    assert saved["data_dir"].endswith("val") and saved["images"] == 60
    assert set(saved["per_class"]) == set(class_names)
    assert {"precision", "recall", "f1", "support"} <= set(saved["per_class"]["circle"])
    assert (out / "confusion.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "reliability.png").read_bytes().startswith(b"\x89PNG")
    # Same images, same transform and decoder as training's validation: the same accuracy and calibration.
    bundle = load_bundle(trained_bundle_path)
    assert report["accuracy"] == pytest.approx(bundle.metrics["best_val_acc"])
    calibration = saved["calibration"]
    assert calibration["ece_before"] == pytest.approx(bundle.calibration["ece_before"], abs=1e-4)
    assert calibration["ece_after"] == pytest.approx(bundle.calibration["ece_after"], abs=1e-4)
    assert calibration["temperatures"] == [bundle.temperature] and len(calibration["reliability_after"]) == 15
    assert round(saved["unknown_fraction"] * 60) <= most_flagged(60, keep=0.95), "the threshold keeps 95% of them known"
    assert list(saved["tta"]) == ["none"]


def test_the_script_evaluates_an_ensemble_with_tta(tmp_path, tiny_bundle_path, demo_data, class_names):
    torch.manual_seed(11)
    second = tmp_path / "second.pt"
    save_bundle(second, PetClassifier(3, arch="resnet18").eval(), class_names, default_preprocess(64))
    argv = ["--model", str(tiny_bundle_path), "--model", str(second), "--data-dir", str(demo_data)]
    argv += ["--out", str(tmp_path / "out"), "--workers", "0", "--tta", "flip"]
    result = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "12 images, accuracy" in result.stdout and "report.json" in result.stdout
    assert "calibration (15-bin ECE)" in result.stdout and "tta flip: accuracy" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["tta"]) == {"none", "flip"} and report["calibration"]["temperatures"] == [1.0, 1.0]
    assert report["version"] == load_ensemble([str(tiny_bundle_path), str(second)]).version
    bad = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *argv, "--device", "cuda:7"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "error: --device cuda:7" in bad.stderr and "Traceback" not in bad.stderr
