"""scripts/benchmark.py runs every mode and reports what it measured (no timing goals here)."""

from __future__ import annotations

import json
import subprocess
import sys

from app.loadgen import closed_loop
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


def test_compare_mode_runs_every_system_once(tiny_bundle_path, tmp_path):
    """The smoke test of the side-by-side run: raw limit, service, MAX_BATCH_SIZE=1 and the naive app, 1 s a point."""
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_bundle_path), "--concurrency", "1", "2", "--seconds", "1", "--warmup", "0.3"]
    argv += ["--out", str(out), "--precision", "fp32", "int8", "--torch-threads", "1"]
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "benchmark.json").read_text())
    systems = {(s["kind"], s["precision"]): s for s in report["systems"]}
    raw = systems["raw", "fp32"]
    assert raw["throughput"] > 0 and raw["forward_ms_b1"] > 0 and raw["torch_threads"] == 1
    assert "scripts/quantize.py" in systems["raw", "int8"]["skipped"]  # no int8 file next to the tiny bundle
    assert "PRECISION" in " ".join(systems["service", "int8"]["error"])  # not a serving setting yet: reported
    for kind in ("service", "unbatched", "naive"):
        points = systems[kind, "fp32"]["points"]
        assert [p["concurrency"] for p in points] == [1, 2], kind
        assert all(p["errors"] == 0 and p["throughput"] > 0 and p["p50_ms"] <= p["p99_ms"] for p in points), kind
        assert all(p["peak_rss_mib"] > 0 and p["client_cpu_ms_per_request"] > 0 for p in points), kind
    assert systems["service", "fp32"]["points"][0]["server"]["mean_batch_size"] >= 1
    assert {p["server"]["mean_batch_size"] for p in systems["unbatched", "fp32"]["points"]} == {1.0}
    assert systems["naive", "fp32"]["points"][0]["server"] is None  # no /metrics: the seed pattern has none
    assert {row["target"] for row in report["targets"]} >= {"service/raw throughput, most clients"}
    table = (out / "benchmark.md").read_text()
    assert "naive Flask (fp32)" in table and "| fp32 | service/raw throughput" in table
    assert (out / "benchmark.png").stat().st_size > 0


def test_serve_mode_measures_a_running_server(gunicorn_server):
    result = closed_loop(gunicorn_server.url, (PHOTOS / "chelsea.jpg").read_bytes(), 2, 1.0, 0.2, observe=True)
    assert result["errors"] == 0 and result["requests"] > 0
    assert result["throughput"] > 0 and result["p50_ms"] <= result["p99_ms"]
    assert result["server"]["mean_batch_size"] >= 1 and result["server"]["forward_ms"] > 0
