"""Zero failed requests through reloads, hot-swaps, recycling and a killed worker: real gunicorn, 2 workers,
8 keep-alive clients, the tiny bundle (short versions of scripts/soak.py's scenarios)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from app.lifecycle import BOOTING, FAILED, READY, Record, handover
from tests.helpers import poll_readyz, start_server
from tools import soak

pytestmark = pytest.mark.slow
API_KEY = "reliability-test-key-0123456789"
WORKERS = 2


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


ALIVE = os.getpid()


@pytest.mark.parametrize(
    ("records", "action"),
    [
        ([], "exit"),  # plain shutdown: nothing newer
        ([Record(1, 1, ALIVE, READY)], "exit"),  # a sibling of the same generation is not a replacement
        ([Record(3, 2, None, BOOTING)], "wait"),  # forked a moment ago
        ([Record(3, 2, ALIVE, BOOTING), Record(4, 2, ALIVE, READY)], "wait"),  # not all of it is ready
        ([Record(3, 2, ALIVE, READY), Record(4, 2, ALIVE, READY)], "exit"),  # the new generation serves
        ([Record(3, 2, ALIVE, FAILED, "bad")], "wait"),  # failed, not reaped yet
        ([Record(3, 2, "dead", FAILED, "bad")], "stay"),  # the reload failed: keep serving
        ([Record(3, 2, "dead", READY)], "exit"),  # it came and went: a shutdown
        ([Record(3, 2, "dead", FAILED), Record(5, 3, ALIVE, BOOTING)], "wait"),  # the newest generation counts
    ],
)
def test_handover_decision(records, action):
    records = [
        Record(r.age, r.generation, dead_pid() if r.pid == "dead" else r.pid, r.state, r.reason) for r in records
    ]
    assert handover(1, records).action == action


def test_a_rejected_generation_no_longer_holds_a_worker_back():
    failed = [Record(3, 2, dead_pid(), FAILED, "bad bundle")]
    assert handover(1, failed) == ("stay", 2, "bad bundle")
    assert handover(1, failed, rejected=2).action == "exit"  # a later SIGTERM is a real shutdown


@pytest.fixture(scope="module")
def server(tiny_bundle_path, tmp_path_factory):
    """A 2-worker server with API keys on, on its own copy of the tiny bundle (MODEL_PATH may be swapped)."""
    workdir = tmp_path_factory.mktemp("reliability")
    model_path = workdir / "current.pt"
    soak.replace_atomically(tiny_bundle_path, model_path)
    # GRACEFUL_TIMEOUT bounds how long gunicorn's master waits in a reload for old workers that stay (bad bundle).
    server = start_server(
        model_path, workdir, workers=WORKERS, API_KEYS=API_KEY, MAX_BATCH_WAIT_MS=10, GRACEFUL_TIMEOUT=10
    )
    try:
        poll_readyz(server)
        soak.wait_for(lambda: soak.ready_workers(server.url) >= WORKERS, 120, "both workers")
        server.model_path = model_path
        yield server
    finally:
        assert server.stop() == 0


def test_reload_hot_swap_and_a_bad_bundle_fail_no_request(server, tiny_bundle_path, tmp_path, cat_jpeg):
    master = server.process.pid
    alternate = tmp_path / "alternate.pt"
    new_version = soak.variant_bundle(tiny_bundle_path, alternate)
    with soak.Load(server.url, cat_jpeg, clients=8, api_key=API_KEY) as load:
        load.wait_answers(8)
        same = soak.reload(server.url, master, load, WORKERS, settle=8)
        swap = soak.hot_swap(server.url, master, load, WORKERS, alternate, server.model_path)
        # A bundle that cannot load: the new generation fails, the old one keeps serving.
        pids = soak.worker_pids(master)
        server.model_path.write_bytes(b"not a bundle")
        bad_start = time.monotonic()
        os.kill(master, signal.SIGHUP)
        soak.wait_for(lambda: server.log().count("keeps serving generation") >= WORKERS, 120, "the failed reload")
        load.wait_answers(8, since=time.monotonic())
        bad = soak.summarize(load.since(bad_start))
    for summary in (same, swap, bad):
        assert summary["non_2xx"] == 0, summary
        assert summary["requests"] > 0
    assert swap["served_version"] == new_version
    assert set(swap["versions_live"]) == {new_version}, "petclf_model_info shows the new version only"
    assert bad["versions"] == {new_version: bad["requests"]}
    assert soak.worker_pids(master) == pids, "the workers that served before the bad reload still serve"
    log = server.log()
    assert "could not load the app" in log and "is not a model bundle" in log
    assert API_KEY not in log, "API keys are never logged"
    soak.replace_atomically(alternate, server.model_path)  # leave a loadable bundle behind


def test_kill_9_of_a_worker_fails_only_its_in_flight_requests(server, cat_jpeg):
    master = server.process.pid
    with soak.Load(server.url, cat_jpeg, clients=8, api_key=API_KEY) as load:
        load.wait_answers(8)
        summary = soak.kill_worker(server.url, master, load, WORKERS, settle=8)
    # At most the requests the killed worker held (8 clients, spread over 2 workers), and each one a clean
    # connection error right away, never a hang. A response the SIGKILL cut between its headers and the end of
    # its body reaches requests as ChunkedEncodingError (seen once so far): the same dropped connection.
    failures = {status: count for status, count in summary["answers"].items() if status != "200"}
    assert summary["failed_after_kill"] == 0 and summary["failed_in_flight"] <= 8, summary
    assert set(failures) <= {"ConnectionError", "ChunkedEncodingError"}, summary
    assert summary["victim"] not in soak.worker_pids(master)


def test_max_requests_recycling_fails_no_request(tiny_bundle_path, tmp_path, cat_jpeg):
    recycled = start_server(tiny_bundle_path, tmp_path, workers=WORKERS, MAX_REQUESTS=30, MAX_REQUESTS_JITTER=10)
    try:
        poll_readyz(recycled)
        soak.wait_for(lambda: soak.ready_workers(recycled.url) >= WORKERS, 120, "both workers")
        with soak.Load(recycled.url, cat_jpeg, clients=8) as load:
            soak.wait_for(lambda: recycled.log().count("Autorestarting worker") >= 2, 120, "recycled workers")
            load.wait_answers(16, since=time.monotonic())  # the replacements serving
        summary = soak.summarize(load.outcomes)
    finally:
        assert recycled.stop() == 0
    assert summary["non_2xx"] == 0, summary
