"""scripts/benchmark.py runs both modes and reports what it measured (no timing goals here)."""

from __future__ import annotations

import json

from benchmark import get_args_parser, main


def test_model_mode_reports_training_and_inference_rates(tmp_path):
    out = tmp_path / "model.json"
    argv = ["--mode", "model", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2"]
    main(get_args_parser().parse_args([*argv, "--seconds", "0.1", "--device", "cpu", "--json", str(out)]))
    (result,) = json.loads(out.read_text())
    assert result["arch"] == "resnet18"
    assert (result["device"], result["amp"]) == ("cpu", "none")
    assert result["train_images_per_s"] > 0
    assert result["inference_images_per_s"] > 0


def test_serve_mode_measures_a_running_server(gunicorn_server, tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--url", gunicorn_server.url, "--requests", "8", "--concurrency", "2", "--warmup", "0"]
    main(get_args_parser().parse_args([*argv, "--json", str(out)]))
    (result,) = json.loads(out.read_text())
    assert result["errors"] == 0
    assert result["throughput_rps"] > 0
    assert result["p50_ms"] <= result["p99_ms"]
    assert result["mean_batch_size"] >= 1
