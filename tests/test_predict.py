"""scripts/predict.py: batch prediction over files and folders, CSV and JSON, unreadable files reported."""

from __future__ import annotations

import csv
import json

import predict
import pytest

pytestmark = pytest.mark.slow


def run(tmp_path, bundle, inputs, *flags):
    """Run predict.main, return the parsed rows it wrote."""
    out = tmp_path / "predictions"
    argv = ["--model", str(bundle), "--output", str(out), "--workers", "0", "--batch-size", "4", *flags]
    rows = predict.main(predict.get_args_parser().parse_args([*map(str, inputs), *argv]))
    return rows, out.read_text()


def test_json_predictions_for_a_folder_and_a_broken_file(tmp_path, trained_bundle_path, demo_data, class_names):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    rows, text = run(tmp_path, trained_bundle_path, [demo_data / "val", broken], "--format", "json", "--top-k", "5")
    assert json.loads(text) == rows
    assert len(rows) == 13
    good, bad = rows[:-1], rows[-1]
    assert all(r["predicted_class"] in class_names and r["error"] is None for r in good)
    assert all(len(r["top_k"]) == 3 and r["top_k"][0]["probability"] == r["confidence"] for r in good)
    assert bad["file"] == str(broken) and bad["predicted_class"] is None and "InvalidImage" in bad["error"]


def test_csv_predictions(tmp_path, trained_bundle_path, demo_data):
    files = sorted((demo_data / "val" / "square").iterdir())[:2]
    _, text = run(tmp_path, trained_bundle_path, files, "--format", "csv", "--top-k", "2")
    parsed = list(csv.DictReader(text.splitlines()))
    assert [r["file"] for r in parsed] == [str(f) for f in files]
    assert all(r["top_k"].count(";") == 1 and float(r["confidence"]) > 0 for r in parsed)
