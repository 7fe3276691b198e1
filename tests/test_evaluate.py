"""Offline evaluation: the report agrees with training's own validation, its files are written, the CLI runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.bundle import load_bundle
from models.training.evaluation import evaluate_bundle
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_evaluate_writes_report_and_confusion_png(tmp_path, trained_bundle_path, training_data, class_names):
    out = tmp_path / "report"
    report = evaluate_bundle(trained_bundle_path, training_data, out, workers=0)
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == pytest.approx(report["accuracy"])
    assert saved["data_dir"].endswith("val") and saved["images"] == 60
    assert set(saved["per_class"]) == set(class_names)
    assert {"precision", "recall", "f1", "support"} <= set(saved["per_class"]["circle"])
    assert (out / "confusion.png").read_bytes().startswith(b"\x89PNG")
    # Same images, same transform and decoder as training's validation: the same accuracy.
    assert report["accuracy"] == pytest.approx(load_bundle(trained_bundle_path).metrics["best_val_acc"])


def test_the_script_prints_the_summary(tmp_path, tiny_bundle_path, demo_data):
    argv = ["--model", str(tiny_bundle_path), "--data-dir", str(demo_data), "--out", str(tmp_path), "--workers", "0"]
    result = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "12 images, accuracy" in result.stdout and "report.json" in result.stdout
    bad = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *argv, "--device", "cuda:7"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "error: --device cuda:7" in bad.stderr and "Traceback" not in bad.stderr
