"""scripts/benchmark.py runs both modes and reports what it measured (no timing goals here)."""

from __future__ import annotations

import json
import subprocess
import sys

from app.harness import measure
from models.training.throughput import model_throughput
from tests.conftest import PHOTOS, REPO_ROOT


def test_model_mode_reports_training_and_inference_rates(tmp_path):
    out = tmp_path / "model.json"
    argv = ["--mode", "model", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2"]
    argv += ["--seconds", "0.1", "--device", "cpu", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (printed,) = json.loads(out.read_text())
    assert printed["arch"] == "resnet18"
    assert (printed["device"], printed["amp"]) == ("cpu", "none")
    assert printed["train_images_per_s"] > 0
    assert printed["inference_images_per_s"] > 0
    assert model_throughput("resnet18", 32, 2, "cpu", "none", 0.05)["inference_images_per_s"] > 0


def test_serve_mode_measures_a_running_server(gunicorn_server):
    result = measure(gunicorn_server.url, (PHOTOS / "chelsea.jpg").read_bytes(), concurrency=2, total=8)
    assert result["errors"] == 0
    assert result["throughput_rps"] > 0
    assert result["p50_ms"] <= result["p99_ms"]
    assert result["mean_batch_size"] >= 1
