"""The real server: the canonical gunicorn command, 2 workers, on a loopback port."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from models.bundle import save_bundle
from models.transforms import default_preprocess
from tests.helpers import PHOTO_NAMES, PHOTOS, REPO_ROOT, poll_readyz, reference_probabilities, start_server

pytestmark = pytest.mark.slow
TIMEOUT = 60
# What gunicorn's master runs before it forks: the config file, then the import of its worker class.
MASTER_PROBE = """
import json, runpy, sys
from gunicorn.util import load_class
runpy.run_path("gunicorn.conf.py")
load_class("app.lifecycle.ServingWorker")
print(json.dumps(sorted(sys.modules)))
"""
HEAVY = ("torch", "torchvision", "flask", "werkzeug", "marshmallow", "prometheus_client")


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, sorted label items): value}."""
    text = requests.get(f"{url}/metrics", timeout=TIMEOUT).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def livez_count_by_pid(metrics_dir: str) -> dict[int, float]:
    """/livez requests counted in each worker's own file."""
    counts = {}
    for path in glob.glob(os.path.join(metrics_dir, "counter_*.db")):
        pid = int(path.rsplit("_", 1)[1].split(".")[0])
        samples = [s for m in MultiProcessCollector.merge([path]) for s in m.samples]
        counts[pid] = sum(
            s.value for s in samples if s.name == "petclf_requests_total" and s.labels.get("route") == "/livez"
        )
    return counts


def test_the_master_imports_no_torch_flask_or_app(tiny_bundle_path, tmp_path):
    env = {**os.environ, "MODEL_PATH": str(tiny_bundle_path), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", MASTER_PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "app.lifecycle" in loaded and "app.config" in loaded  # the probe really read the settings
    assert not [name for name in loaded if name.split(".")[0] in HEAVY], "the master imports the app's libraries"
    assert not [name for name in loaded if name.startswith(("app.factory", "app.service", "app.routes"))]


def test_a_running_master_holds_no_torch(gunicorn_server):
    maps = f"/proc/{gunicorn_server.process.pid}/maps"
    if not os.path.exists(maps):
        pytest.skip("needs Linux /proc to look into the master's memory")
    with open(maps) as handle:  # importing torch maps its native libraries (torch/_C, libtorch*) into the process
        mapped = {line.split()[-1] for line in handle if "/" in line}
    assert not [path for path in mapped if "torch" in os.path.basename(path) or "/torch/" in path], mapped


def test_concurrent_requests_are_batched_and_match_the_model(gunicorn_server, tiny_bundle_path):
    photos = {name: (PHOTOS / f"{name}.jpg").read_bytes() for name in PHOTO_NAMES}
    expected = {name: reference_probabilities(tiny_bundle_path, data) for name, data in photos.items()}
    jobs = [name for name in PHOTO_NAMES for _ in range(6)]

    def single(name):
        response = requests.post(f"{gunicorn_server.url}/predict", files={"image": photos[name]}, timeout=TIMEOUT)
        return name, response

    def batch(_):
        files = [("image", photos[name]) for name in PHOTO_NAMES]
        return requests.post(f"{gunicorn_server.url}/predict/batch", files=files, timeout=TIMEOUT)

    with ThreadPoolExecutor(12) as pool:
        singles = list(pool.map(single, jobs))
        batches = list(pool.map(batch, range(4)))
    for name, response in singles:
        assert response.status_code == 200, response.text
        assert list(response.json()["all_probabilities"].values()) == pytest.approx(expected[name], abs=1e-4)
    for response in batches:
        assert response.status_code == 200, response.text
        for name, result in zip(PHOTO_NAMES, response.json()["predictions"], strict=True):
            assert list(result["all_probabilities"].values()) == pytest.approx(expected[name], abs=1e-4)
    samples = scrape(gunicorn_server.url)
    assert samples[("petclf_batch_size_bucket", (("le", "1.0"),))] < samples[("petclf_batch_size_count", ())]
    assert samples[("petclf_batch_size_sum", ())] >= len(jobs) + 4 * len(PHOTO_NAMES)


def test_counts_from_both_workers_add_up(gunicorn_server):
    metrics_dir = os.path.join(os.path.dirname(gunicorn_server.log_path), "metrics")
    before = sum(livez_count_by_pid(metrics_dir).values())
    sent = 0
    # New connections land on either worker; send until both have answered some (bounded).
    while sent < 400 and sum(1 for count in livez_count_by_pid(metrics_dir).values() if count) < 2:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: requests.get(f"{gunicorn_server.url}/livez", timeout=TIMEOUT), range(16)))
        sent += 16
    per_worker = livez_count_by_pid(metrics_dir)
    assert sum(1 for count in per_worker.values() if count) == 2, per_worker
    for _ in range(4):  # whichever worker answers the scrape reports the total of both
        assert scrape(gunicorn_server.url)[("petclf_requests_total", (("route", "/livez"), ("status", "200")))] == (
            before + sent
        )
    infos = {key: value for key, value in scrape(gunicorn_server.url).items() if key[0] == "petclf_model_info"}
    assert list(infos.values()) == [2.0], "one model, served by two live workers"


def test_model_and_openapi_over_http(gunicorn_server, class_names):
    assert requests.get(f"{gunicorn_server.url}/model", timeout=TIMEOUT).json()["class_names"] == class_names
    assert requests.get(f"{gunicorn_server.url}/openapi.json", timeout=TIMEOUT).json()["openapi"].startswith("3.")
    response = requests.post(f"{gunicorn_server.url}/predict", data=b"junk", timeout=TIMEOUT)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


@pytest.fixture
def slow_bundle(tmp_path, tiny_model, class_names):
    """The tiny model with 448-pixel preprocessing: warm-up and every forward pass take a noticeable time."""
    path = tmp_path / "slow.pt"
    save_bundle(path, tiny_model, class_names, default_preprocess(448))
    return path


def wait_for_metric(url: str, name: str, value: float) -> None:
    deadline = time.monotonic() + TIMEOUT
    while scrape(url).get((name, ()), 0) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_first_answer_is_ready_then_sigterm_drains(slow_bundle, tmp_path, cat_jpeg):
    # The worker accepts only once warm: a probe during warm-up waits (connected, unanswered), then gets 200,
    # never a 503. One worker; three requests queue behind a slow forward pass, so they are in flight at SIGTERM.
    server = start_server(slow_bundle, tmp_path, workers=1, MAX_BATCH_SIZE=4)
    try:
        statuses = poll_readyz(server)
        assert statuses == [200]
        with ThreadPoolExecutor(4) as pool:
            post = lambda _: requests.post(f"{server.url}/predict", files={"image": cat_jpeg}, timeout=TIMEOUT)  # noqa: E731
            futures = [pool.submit(post, 0)]
            wait_for_metric(server.url, "petclf_queue_wait_seconds_count", 1)  # the first one is computing
            futures += [pool.submit(post, i) for i in range(1, 4)]
            wait_for_metric(server.url, "petclf_queue_depth", 3)
            assert server.stop() == 0
            responses = [future.result() for future in futures]
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.json()["predicted_class"] for r in responses)
    assert "draining" in server.log()
