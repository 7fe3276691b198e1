"""Settings: defaults, environment, overrides, validation; device resolution; the gunicorn config file."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, fields

import pytest
import torch

from app import create_app
from app.config import (
    VARIABLES,
    ConfigError,
    ServerSettings,
    Settings,
    default_torch_threads,
    load_server_settings,
    load_settings,
)
from app.gpu_decode import GpuDecoder
from app.inference import serving_device
from models.runtime import resolve_device
from models.settings import between, declared, setting, variables
from models.training.config import TrainConfig
from models.transforms import default_preprocess
from tests.helpers import REPO_ROOT


def test_defaults():
    settings = load_settings({})
    assert settings.model_path == "models/pet_classifier.pt"
    assert settings.device == "auto" and settings.precision == "fp32"
    assert settings.torch_threads == default_torch_threads({})
    assert settings.model_name == "pet-classifier"
    assert settings.max_upload_bytes == int(settings.max_upload_mb * 1024 * 1024)


def test_each_setting_is_declared_once_with_its_variable():
    assert len(VARIABLES) == len(set(VARIABLES)) == len(fields(Settings)) + len(fields(ServerSettings))
    assert all(name == field.upper() for cls in (Settings, ServerSettings) for name, field in variables(cls).items())
    assert not variables(TrainConfig)  # training reads flags, through the same declarations
    with pytest.raises(TypeError, match=r"\['forgotten'\] are not declared"):

        @declared
        @dataclass(frozen=True)
        class Half:
            declared_one: int = setting(1, between(int, 0), env="DECLARED_ONE")
            forgotten: int = 2


def test_environment_then_overrides():
    env = {"MAX_BATCH_SIZE": "8", "MAX_BATCH_WAIT_MS": "2.5", "DEVICE": "CPU", "UNRELATED": "x"}
    settings = load_settings(env, {"MAX_BATCH_SIZE": 4, "LOG_LEVEL": "DEBUG"})
    assert settings.max_batch_size == 4  # the override wins
    assert settings.max_batch_wait_ms == 2.5
    assert settings.device == "cpu"
    assert settings.log_level == "debug"


def test_model_path_lists_an_ensemble():
    settings = load_settings({"MODEL_PATH": " a.pt , b.pt "})
    assert settings.model_paths == ("a.pt", "b.pt") and settings.model_path == "a.pt,b.pt"
    assert load_settings({}).model_paths == ("models/pet_classifier.pt",)


def test_empty_values_mean_default():
    assert load_settings({"MAX_QUEUE": ""}).max_queue == Settings().max_queue


def test_torch_threads_split_cores_between_workers():
    cores = default_torch_threads({"WEB_CONCURRENCY": "1"})
    assert default_torch_threads({"WEB_CONCURRENCY": str(cores * 4)}) == 1
    assert load_settings({"TORCH_THREADS": "3"}).torch_threads == 3


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("MAX_BATCH_SIZE", "0", "[1, 1024]"),
        ("MAX_BATCH_SIZE", "abc", "integer"),
        ("MAX_BATCH_SIZE", "2.5", "integer"),
        ("MAX_BATCH_WAIT_MS", "-1", "number"),
        ("MAX_QUEUE", "0", "[1, "),
        ("REQUEST_TIMEOUT_S", "0", "number"),
        ("MAX_UPLOAD_MB", "lots", "number"),
        ("MAX_IMAGE_PIXELS", "0", "integer"),
        ("MAX_BATCH_FILES", "5000", "[1, 1024]"),
        ("TORCH_THREADS", "0", "integer"),
        ("DEVICE", "gpu", "auto, cpu, cuda, cuda:N"),
        ("DEVICE", "cuda:x", "cuda:N"),
        ("PRECISION", "fp8", "fp32, fp16, bf16"),
        ("LOG_LEVEL", "loud", "debug, info"),
        ("MODEL_PATH", "   ", "path"),
        ("MODEL_NAME", "pets/v1", "letters, digits, '.', '_' or '-'"),
        ("MODEL_NAME", "-pets", "starting with a letter or digit"),
        ("MODEL_NAME", "sha256:1a2b", "letters, digits"),
        ("MODEL_PATH", "a.pt,,b.pt", "empty bundle path"),
        ("MODEL_PATH", "a.pt,a.pt", "listed more than once"),
        ("EXPLAIN_CONCURRENCY", "0", "[1, 64]"),
        ("UI_ENABLED", "maybe", "true, 1, yes, on, false"),
        ("DECODE_BUDGET_MB", "0", "[1, "),
        ("BODY_TIMEOUT_S", "never", "number"),
        ("BODY_MIN_RATE_KBPS", "0", "number"),
    ],
)
def test_bad_values_name_the_variable(name, value, hint):
    with pytest.raises(ConfigError) as error:
        load_settings({name: value})
    assert name in str(error.value)
    assert hint in str(error.value)


def test_fp16_needs_cuda():  # bf16 on CPU depends on the CPU: tests/test_precision.py
    with pytest.raises(ConfigError, match="PRECISION"):
        load_settings({"DEVICE": "cpu", "PRECISION": "fp16"})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"DEVICE": "cuda", "PRECISION": "int8"}, "PRECISION=int8 with DEVICE=cuda: int8 runs on x86 CPUs only"),
        ({"DEVICE": "cuda:1", "PRECISION": "int8"}, "on cuda use fp16 or bf16, or set DEVICE=cpu"),
        ({"DEVICE": "cpu", "GPU_DECODE": "true"}, "GPU_DECODE=true with DEVICE=cpu"),
    ],
)
def test_cpu_and_gpu_only_settings_are_refused_on_the_other_device(env, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_decode_needs_a_gpu_at_start_up():
    with pytest.raises(ConfigError, match="GPU_DECODE=true needs a CUDA device"):
        serving_device(load_settings({"DEVICE": "auto", "GPU_DECODE": "true"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
@pytest.mark.parametrize(
    ("env", "match"),
    [({"DEVICE": "cuda"}, "CUDA is not available"), ({"DEVICE": "auto", "PRECISION": "fp16"}, "needs a CUDA")],
)
def test_device_resolution_refuses_what_the_machine_lacks(env, match):
    with pytest.raises(ConfigError, match=match):
        serving_device(load_settings(env))


def test_auto_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert serving_device(load_settings({"DEVICE": "auto"})).type == expected


def test_serving_never_picks_mps_which_it_refuses_by_name(monkeypatch):
    # An Apple machine without CUDA: training's auto takes mps, serving's stays on the CPU it is tested on.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    assert serving_device(load_settings({"DEVICE": "auto"})).type == "cpu"
    with pytest.raises(ConfigError, match="DEVICE='mps' is invalid.*mps is for training"):
        load_settings({"DEVICE": "mps"})


def _check_config(env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gunicorn", "--check-config", "-c", "gunicorn.conf.py", "app:create_app()"]
    return subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE='0' is invalid: must be an integer in [1, 1024]"),
        ({"MODEL_PATH": "/no/such/bundle.pt"}, "MODEL_PATH='/no/such/bundle.pt' is not a file; train a bundle first"),
        ({"MODEL_PATH": "{tiny},/no/such/b.pt"}, "MODEL_PATH='/no/such/b.pt' is not a file"),  # every member
    ],
)
def test_gunicorn_config_refuses_bad_settings_before_forking(tmp_path, tiny_bundle_path, env, message):
    env = {key: value.format(tiny=tiny_bundle_path) for key, value in env.items()}
    result = _check_config({**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_gunicorn_refuses_a_bad_worker_count(tmp_path):
    # gunicorn itself parses WEB_CONCURRENCY (with its own traceback) before reading gunicorn.conf.py.
    result = _check_config({"WEB_CONCURRENCY": "none", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert result.returncode != 0 and "WEB_CONCURRENCY" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_app_refuses_an_unusable_device_at_start_up(tiny_bundle_path):
    with pytest.raises(ConfigError, match="DEVICE=cuda"):
        create_app({"MODEL_PATH": str(tiny_bundle_path), "DEVICE": "cuda"})


def test_gunicorn_takes_its_server_settings_from_app_config(tmp_path, tiny_bundle_path):
    command = [sys.executable, "-m", "gunicorn", "--print-config", "-c", "gunicorn.conf.py", "app:create_app()"]
    env = {"MODEL_PATH": str(tiny_bundle_path), "MAX_REQUESTS": "500", "MAX_REQUESTS_JITTER": "50", "ACCESS_LOG": "off"}
    result = subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    printed = dict(map(str.strip, line.split(" = ", 1)) for line in result.stdout.splitlines() if " = " in line)
    assert {k: printed[k] for k in ("max_requests", "max_requests_jitter", "worker_class", "accesslog")} == {
        "max_requests": "500",
        "max_requests_jitter": "50",
        "worker_class": "app.lifecycle.ServingWorker",
        "accesslog": "None",
    }


@pytest.mark.parametrize(("name", "value"), [("MAX_REQUESTS", "-1"), ("MAX_REQUESTS_JITTER", "lots")])
def test_bad_server_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=f"{name}='{value}' is invalid: must be an integer"):
        load_server_settings({name: value})


def test_the_gpu_decoder_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="GPU_DECODE needs a CUDA device, not cpu"):
        GpuDecoder(default_preprocess(64), torch.device("cpu"), 1_000_000)
