"""scripts/evaluate.py: the report agrees with training's own validation, and its files are written."""

from __future__ import annotations

import json

import evaluate
import pytest

from models.bundle import load_bundle

pytestmark = pytest.mark.slow


def test_evaluate_writes_report_and_confusion_png(tmp_path, trained_bundle_path, training_data, class_names):
    out = tmp_path / "report"
    args = evaluate.get_args_parser().parse_args(
        ["--model", str(trained_bundle_path), "--data-dir", str(training_data), "--out", str(out), "--workers", "0"]
    )
    report = evaluate.main(args)
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == pytest.approx(report["accuracy"])
    assert saved["data_dir"].endswith("val") and saved["images"] == 60
    assert set(saved["per_class"]) == set(class_names)
    assert {"precision", "recall", "f1", "support"} <= set(saved["per_class"]["circle"])
    assert (out / "confusion.png").read_bytes().startswith(b"\x89PNG")
    # Same images, same transform and decoder as training's validation: the same accuracy.
    assert report["accuracy"] == pytest.approx(load_bundle(trained_bundle_path).metrics["best_val_acc"])
