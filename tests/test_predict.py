"""Offline batch prediction over files and folders: CSV and JSON, unreadable files reported, the CLI runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from models.bundle import save_bundle
from models.pet_classifier import PetClassifier
from models.training.prediction import predict_files, render
from models.transforms import default_preprocess
from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.numerics]


def run(bundle, inputs, fmt: str, k: int):
    """predict_files + render, as the script does; returns (rows, text)."""
    rows = predict_files(bundle, [str(p) for p in inputs], k=k, batch_size=4, workers=0)
    return rows, render(rows, fmt)


def test_json_predictions_for_a_folder_and_a_broken_file(tmp_path, trained_bundle_path, demo_data, class_names):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    rows, text = run(trained_bundle_path, [demo_data / "val", broken], "json", 5)
    assert json.loads(text) == rows
    assert len(rows) == 13
    good, bad = rows[:-1], rows[-1]
    assert all(r["predicted_class"] in class_names and r["error"] is None for r in good)
    assert all(len(r["top_k"]) == 3 and r["top_k"][0]["probability"] == r["confidence"] for r in good)
    assert all(isinstance(r["unknown"], bool) and isinstance(r["ood_score"], float) for r in good)
    assert all(set(r["top_k"][0]) == {"label", "probability"} for r in good)  # the service's top-k shape
    assert bad["file"] == str(broken) and bad["predicted_class"] is None and "InvalidImage" in bad["error"]
    assert bad["unknown"] is None and bad["ood_score"] is None


def test_csv_predictions(trained_bundle_path, demo_data):
    files = sorted((demo_data / "val" / "square").iterdir())[:2]
    _, text = run(trained_bundle_path, files, "csv", 2)
    parsed = list(csv.DictReader(text.splitlines()))
    assert [r["file"] for r in parsed] == [str(f) for f in files]
    assert all(r["top_k"].count(";") == 1 and float(r["confidence"]) > 0 for r in parsed)


def test_the_script_writes_the_output_file(tmp_path, tiny_bundle_path, demo_data, class_names):
    out = tmp_path / "out" / "predictions.json"
    second = tmp_path / "second.pt"
    torch.manual_seed(12)
    save_bundle(second, PetClassifier(3, arch="resnet18").eval(), class_names, default_preprocess(64))
    folder = demo_data / "val" / "circle"
    argv = [str(folder), "--model", str(tiny_bundle_path), "--model", str(second), "--format", "json"]
    result = subprocess.run(
        [sys.executable, "scripts/predict.py", *argv, "--output", str(out), "--workers", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 4
    # The ensemble's probabilities are the mean of its members' (top 3 of 3 classes = every probability).
    members = [predict_files(path, [str(folder)], workers=0) for path in (tiny_bundle_path, second)]
    for row, *singles in zip(rows, *members, strict=True):
        maps = [{e["label"]: e["probability"] for e in r["top_k"]} for r in (row, *singles)]
        assert maps[0] == pytest.approx({k: (maps[1][k] + maps[2][k]) / 2 for k in maps[0]}, abs=1e-6)
        assert row["unknown"] is False and row["ood_score"] is None  # neither bundle has a detector
