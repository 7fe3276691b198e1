"""scripts/benchmark.py runs every mode and reports what it measured (no timing goals here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from models.training.throughput import model_throughput
from tests.helpers import PHOTOS, REPO_ROOT
from tools.loadgen import closed_loop


def test_model_mode_reports_training_and_inference_rates(tmp_path):
    out = tmp_path / "model.json"
    argv = ["--mode", "model", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2"]
    argv += ["--seconds", "0.1", "--device", "cpu", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (printed,) = json.loads(out.read_text())
    assert printed["arch"] == "resnet18"
    assert (printed["device"], printed["amp"]) == ("cpu", "none")
    assert printed["train_images_per_s"] > 0
    assert printed["inference_images_per_s"] > 0
    assert model_throughput("resnet18", 32, 2, "cpu", "none", 0.05)["inference_images_per_s"] > 0


def test_compare_mode_runs_every_system_once(tiny_bundle_path, tmp_path):
    """The smoke test of the side-by-side run: raw limit, service, MAX_BATCH_SIZE=1 and the naive app, 0.5 s a point
    (the int8 systems are the same code with PRECISION=int8: tests/test_precision.py serves int8)."""
    out = tmp_path / "bench"
    argv = ["--model", str(tiny_bundle_path), "--concurrency", "2", "--seconds", "0.5", "--warmup", "0.2"]
    argv += ["--out", str(out), "--precision", "fp32", "--torch-threads", "1", "--env", "LOG_LEVEL=info"]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "benchmark.json").read_text())
    assert report["config"]["extra_env"] == {"LOG_LEVEL": "info"}
    systems = {(s["kind"], s["precision"]): s for s in report["systems"] if s["kind"] != "raw"}
    raws = {s["backend"]: s for s in report["systems"] if s["kind"] == "raw"}
    raw = raws["torch"]  # the raw limit runs on every runtime: PyTorch, and ONNX Runtime, skipped without a graph
    assert raw["throughput"] > 0 and raw["forward_ms_b1"] > 0 and raw["torch_threads"] == 1
    assert "no fp32 graph" in raws["onnxruntime"]["skipped"] and "scripts/export.py" in raws["onnxruntime"]["skipped"]
    for kind in ("service", "unbatched", "naive"):
        (point,) = systems[kind, "fp32"]["points"]
        assert point["concurrency"] == 2 and point["errors"] == 0 and point["throughput"] > 0, kind
        assert point["p50_ms"] <= point["p99_ms"] and point["client_cpu_ms_per_request"] > 0, kind
        assert point["peak_rss_mib"] > 0 and "rss_growth_mib" in point, kind
    assert systems["service", "fp32"]["points"][0]["server"]["mean_batch_size"] >= 1
    assert systems["unbatched", "fp32"]["points"][0]["server"]["mean_batch_size"] == 1.0
    (served,) = systems["service", "fp32"]["served"]  # what BACKEND=auto chose: PyTorch, since there is no graph
    assert served["backend"] == "torch" and "no fp32 graph" in served["reason"]
    assert systems["naive", "fp32"]["points"][0]["server"] is None  # no /metrics: the seed pattern has none
    assert {row["target"] for row in report["targets"]} >= {"service/raw throughput, most clients"}
    table = (out / "benchmark.md").read_text()
    assert "naive Flask (fp32)" in table and "| service (fp32) | service/raw throughput" in table
    assert "| service (fp32) = torch | 2 |" in table
    assert (out / "benchmark.png").stat().st_size > 0


def test_serve_mode_measures_a_running_server(gunicorn_server):
    result = closed_loop(gunicorn_server.url, (PHOTOS / "chelsea.jpg").read_bytes(), 2, 1.0, 0.2, observe=True)
    assert result["errors"] == 0 and result["requests"] > 0
    assert result["throughput"] > 0 and result["p50_ms"] <= result["p99_ms"]
    assert result["server"]["mean_batch_size"] >= 1 and result["server"]["forward_ms"] > 0


def _gpu_check(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip


def test_gpu_check_parses_its_arguments_and_needs_cuda(tmp_path):
    shown = _gpu_check("--help")
    assert shown.returncode == 0 and "--wheelhouse DIR" in shown.stdout and "pip download" in shown.stdout
    unknown = _gpu_check("--bogus")
    assert unknown.returncode == 2 and "unknown argument '--bogus'" in unknown.stderr
    assert _gpu_check("--seconds", "ten").returncode == 2
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal is for machines without one")
    refused = _gpu_check("--out", str(tmp_path / "out"), "--wheelhouse", str(tmp_path))
    assert refused.returncode == 3 and "no CUDA device" in refused.stderr
    assert not (tmp_path / "out").exists()  # refused before installing or writing anything


def test_targets_use_the_fastest_raw_runtime_and_compare_the_services():
    from tools.benchmark import fastest_raw, targets

    def service(backend, throughput):
        point = {"concurrency": 32, "throughput": throughput, "p50_ms": 100.0, "p99_ms": 150.0}
        return {"kind": "service", "system": backend, "precision": "int8", "backend": backend, "points": [point]}

    report = {
        "config": {"concurrencies": [32], "precisions": ["int8"]},
        "systems": [
            {"kind": "raw", "precision": "int8", "backend": "torch", "throughput": 60.0},
            {"kind": "raw", "precision": "int8", "backend": "onnxruntime", "throughput": 80.0},
            {"kind": "raw", "precision": "int8", "backend": "onnxruntime", "skipped": "no graph"},
            service("auto", 64.0),
            service("torch", 48.0),
        ],
    }
    assert fastest_raw(report, "int8")["backend"] == "onnxruntime"
    rows = targets(report)
    values = {row["target"]: row["value"] for row in rows if row["system"] == "auto"}
    assert values["service/raw throughput, most clients"] == 0.8  # 64 / the fastest raw's 80, not PyTorch's 60
    assert values["service/PyTorch service throughput, most clients"] == round(64 / 48, 3)
    torch_values = {row["target"]: row for row in rows if row["system"] == "torch"}  # every service is judged
    assert torch_values["service/raw throughput, most clients"]["value"] == 0.6
    assert torch_values["service/raw throughput, most clients"]["goal"] == 0.8  # int8's goal (issue 22)
    assert "service/PyTorch service throughput, most clients" not in torch_values
