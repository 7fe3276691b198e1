"""Reliability under load: keep-alive clients post a real photo while the server is reloaded, hot-swapped,
recycled, killed or overloaded; every answer is recorded and summarised.

Used by scripts/soak.py (the long runs) and tests/test_reliability.py (short ones); the service never imports
it. Traffic goes only to the loopback server these functions start themselves.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
import torch
from PIL import Image

from app.config import Settings, load_settings
from models.bundle import load_model, save_bundle
from tools.harness import ready_workers, serving
from tools.loadgen import children as worker_pids  # the live children of gunicorn's master: its workers
from tools.loadgen import status_kib

CLIENT_TIMEOUT_S = 60.0  # far above REQUEST_TIMEOUT_S: a request that hangs shows up as a Timeout outcome


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (time.monotonic()), how long it took, and its answer."""

    started: float
    seconds: float
    status: int | str  # the HTTP status, or the name of the exception the client got instead
    version: str | None = None  # model_version of a 200
    retry_after: bool = False  # whether the answer carried Retry-After


@dataclass
class Load:
    """`clients` keep-alive clients posting `data` to `url`/predict until stopped, `max_seconds` at most."""

    url: str
    data: bytes
    clients: int = 8
    max_seconds: float = 600.0
    api_key: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every client after its current request and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_S + 5)

    def _client(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with requests.Session() as session:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.outcomes.append(post(session, self.url, self.data, self.api_key))

    def wait_answers(self, count: int, since: float | None = None, timeout: float = 120) -> None:
        """Wait until `count` requests started at or after `since` (default: the load's start) have their answer."""
        since = self.started if since is None else since
        wait_for(lambda: len(self.since(since)) >= count, timeout, f"{count} answers", 0.02)

    def since(self, moment: float) -> list[Outcome]:
        """The outcomes of requests started at or after `moment`."""
        return [outcome for outcome in list(self.outcomes) if outcome.started >= moment]


def post(session: requests.Session, url: str, data: bytes, api_key: str | None = None) -> Outcome:
    """POST one JPEG to /predict (with `Authorization: Bearer api_key` when given) and record what came back."""
    headers = {"Content-Type": "image/jpeg", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    start = time.monotonic()
    try:
        response = session.post(f"{url}/predict", data=data, headers=headers, timeout=CLIENT_TIMEOUT_S)
    except requests.RequestException as error:
        return Outcome(start, time.monotonic() - start, type(error).__name__)
    version = response.json().get("model_version") if response.status_code == 200 else None
    return Outcome(start, time.monotonic() - start, response.status_code, version, "Retry-After" in response.headers)


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts by answer, failures, latency percentiles (ms) and the model versions answered."""
    latencies = sorted(outcome.seconds for outcome in outcomes if outcome.status == 200)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0] if latencies else 0] * 99
    statuses = Counter(str(outcome.status) for outcome in outcomes)
    return {
        "requests": len(outcomes),
        "answers": dict(sorted(statuses.items())),
        "non_2xx": sum(count for status, count in statuses.items() if status != "200"),
        "p50_ms": round(cuts[49] * 1000, 1),
        "p99_ms": round(cuts[98] * 1000, 1),
        "max_ms": round(max(latencies, default=0) * 1000, 1),
        "versions": dict(Counter(outcome.version for outcome in outcomes if outcome.version)),
    }


# The server's processes


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MiB (0 when it is gone)."""
    return status_kib(pid, "VmRSS:") / 1024


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Poll `condition` until true; seconds it took; TimeoutError naming `what`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not seen after {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


def served_version(url: str, api_key: str | None = None) -> str | None:
    """The version /model reports (None while nobody answers)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return requests.get(f"{url}/model", headers=headers, timeout=10).json()["version"]
    except (requests.RequestException, ValueError, KeyError):
        return None


def live_versions(url: str) -> dict[str, float]:
    """petclf_model_info: model version -> live warmed workers serving it (non-zero ones)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    versions = {}
    for line in text.splitlines():
        if line.startswith("petclf_model_info{") and float(line.rsplit(" ", 1)[1]):
            labels = line[line.index("{") + 1 : line.index("}")]
            version = dict(part.split("=", 1) for part in labels.split(","))["version"].strip('"')
            versions[version] = float(line.rsplit(" ", 1)[1])
    return versions


# Bundles


def replace_atomically(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy `source` over `target` so that a reader sees the old file or the new one, never a partial one."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), suffix=".partial")
    os.close(fd)
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def variant_bundle(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """A copy of a bundle with one weight nudged, so it has another version; returns that version."""
    model, bundle = load_model(source)
    with torch.no_grad():
        next(model.parameters()).add_(1e-4)
    return save_bundle(target, model, bundle.class_names, bundle.preprocess, bundle.metrics, bundle.training)


# Scenarios: each runs under a Load already going, and summarises the requests started since its action


def _replaced(url: str, master: int, old: set[int], workers: int) -> bool:
    current = set(worker_pids(master))
    return len(current) == workers and not current & old and ready_workers(url) >= workers


def reload(url: str, master: int, load: Load, workers: int, settle: int = 32) -> dict:
    """`kill -HUP <master>` under load: every worker replaced; the summary covers the requests since the HUP, up to
    `settle` answers after the new generation is ready."""
    old = set(worker_pids(master))
    start = time.monotonic()
    os.kill(master, signal.SIGHUP)
    replaced = wait_for(lambda: _replaced(url, master, old, workers), 120, "the new generation of workers")
    load.wait_answers(settle, since=time.monotonic())
    return {"replaced_s": round(replaced, 1), "versions_live": live_versions(url), **summarize(load.since(start))}


def hot_swap(url: str, master: int, load: Load, workers: int, bundle: str, model_path: str) -> dict:
    """Replace MODEL_PATH's file atomically with `bundle`, then reload; when every answer switched."""
    replace_atomically(bundle, model_path)
    start = time.monotonic()
    summary = reload(url, master, load, workers)
    new = served_version(url, load.api_key)
    old_answers = [o.started for o in load.since(start) if o.version and o.version != new]
    summary["switched_s"] = round(max(old_answers, default=start) - start, 1)  # last request the old model took
    summary["served_version"] = new
    return summary


def kill_worker(url: str, master: int, load: Load, workers: int, settle: int = 32) -> dict:
    """`kill -9` of one worker under load: failures are limited to its in-flight requests; it is replaced."""
    victim = worker_pids(master)[0]
    start = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    # Its sockets close only when the kernel has torn the process down (a few ms after the signal): a request
    # written to one of its keep-alive connections until then reached the killed worker, like one it computed.
    closed = start + wait_for(lambda: victim not in worker_pids(master), 10, "the killed worker's exit", 0.001)
    replaced = wait_for(
        lambda: ready_workers(url) >= workers and len(worker_pids(master)) == workers, 120, "a replacement worker"
    )
    load.wait_answers(settle, since=time.monotonic())  # the replacement serving
    outcomes = load.since(start - CLIENT_TIMEOUT_S)  # requests in flight at the kill started before it
    affected = [o for o in outcomes if o.started + o.seconds >= start]
    failed = [o for o in affected if o.status != 200]
    return {
        "replaced_s": round(replaced, 1),
        "victim": victim,
        **summarize(affected),
        "failed_in_flight": sum(1 for o in failed if o.started < closed),  # reached the killed worker
        "failed_after_kill": sum(1 for o in failed if o.started >= closed),  # sent once it was gone: must be 0
        "exit_ms": round((closed - start) * 1000, 1),
        "slowest_failure_ms": round(max((o.seconds for o in failed), default=0) * 1000, 1),  # no hang
    }


def recycling(url: str, master: int, load: Load, seconds: float) -> dict:
    """max_requests recycling under load for `seconds`: how many workers were replaced, and every answer."""
    start, seen = time.monotonic(), set(worker_pids(master))
    while time.monotonic() - start < seconds:
        seen |= set(worker_pids(master))
        time.sleep(0.2)
    return {"workers_seen": len(seen), **summarize(load.since(start))}


def reload_scenarios(bundle: str, data: bytes, workdir: str, env: dict, log_path: str, seconds: float = 20) -> dict:
    """Every reload scenario of issue 10 with 2 workers and 8 keep-alive clients; one summary per scenario."""
    model_path = os.path.join(workdir, "current.pt")
    alternate = os.path.join(workdir, "alternate.pt")
    shutil.copyfile(bundle, model_path)
    variant_bundle(bundle, alternate)
    results = {}
    base = {"MODEL_PATH": model_path, **env}
    with open(log_path, "ab") as log, serving(base, log, workers=2) as (server, url), Load(url, data) as load:
        load.wait_answers(32)
        results["hup_same_bundle"] = reload(url, server.pid, load, 2)
        results["hup_new_bundle"] = hot_swap(url, server.pid, load, 2, alternate, model_path)
        results["kill_9_worker"] = kill_worker(url, server.pid, load, 2)
    recycle = {**base, "MAX_REQUESTS": 40, "MAX_REQUESTS_JITTER": 20}
    with open(log_path, "ab") as log, serving(recycle, log, workers=2) as (server, url), Load(url, data) as load:
        results["max_requests_recycling"] = recycling(url, server.pid, load, seconds)
    return results


def overload(bundle: str, data: bytes, env: dict, log_path: str, clients: int = 256, seconds: float = 120) -> dict:
    """`clients` keep-alive clients for `seconds` against one worker: answers, latency, RSS, recovery."""
    limit = float(env.get("REQUEST_TIMEOUT_S", 10))
    with open(log_path, "ab") as log, serving({"MODEL_PATH": bundle, **env}, log) as (server, url):
        baseline = _sequential_ms(url, data)
        (worker,) = worker_pids(server.pid)
        rss = [rss_mb(worker)]
        with Load(url, data, clients, max_seconds=seconds) as load:
            while time.monotonic() - load.started < seconds:
                time.sleep(2)
                rss.append(rss_mb(worker))
        stopped = time.monotonic()
        wait_for(lambda: _sequential_ms(url, data, 1) <= 2 * baseline, 60, "normal latency", 0)
        recovered = round(time.monotonic() - stopped, 1)
        after = _sequential_ms(url, data)
        alive = worker in worker_pids(server.pid)
    outcomes = load.outcomes
    accepted = [o.seconds for o in outcomes if o.status == 200]
    return {
        "clients": clients,
        "seconds": seconds,
        **summarize(outcomes),
        "throughput_rps": round(len(accepted) / seconds, 1),
        "503_without_retry_after": sum(1 for o in outcomes if o.status == 503 and not o.retry_after),
        "accepted_over_request_timeout": sum(1 for s in accepted if s > limit),
        "rss_mb": {"start": round(rss[0]), "max": round(max(rss)), "end": round(rss[-1])},
        "worker_survived": alive,
        "sequential_p50_ms": {"before": baseline, "after": after},
        "back_to_normal_s": recovered,  # from the load's end to a request within 2x the quiet median
    }


def _sequential_ms(url: str, data: bytes, count: int = 20) -> float:
    """Median latency of `count` one-at-a-time requests (what "normal" is), in ms."""
    with requests.Session() as session:
        outcomes = [post(session, url, data) for _ in range(count)]
    return round(statistics.median(o.seconds for o in outcomes) * 1000, 1)


# The worst case the limits allow (issue 21)


def most_expensive_image(max_pixels: int) -> bytes:
    """The costliest file to decode under MAX_IMAGE_PIXELS: a square float32 greyscale TIFF (4 bytes a pixel once
    decoded, the most Pillow holds) just under the limit, deflated to a few hundred KB."""
    side = math.isqrt(max_pixels)
    buffer = io.BytesIO()
    Image.new("F", (side, side), 1000.5).save(buffer, "TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()


def worst_case(url: str, worker: int, data: bytes, clients: int, rounds: int = 1, path: str = "/predict") -> dict:
    """`clients` clients at once (e.g. THREADS), each posting `data` `rounds` times: the answers, and the worker's
    resident memory before and at its peak (VmHWM, reset first), and whether it survived."""
    with open(f"/proc/{worker}/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := the current resident size
    before = status_kib(worker, "VmRSS:")
    barrier = threading.Barrier(clients)
    outcomes: list[Outcome] = []

    def client() -> None:
        with requests.Session() as session:
            barrier.wait()
            for _ in range(rounds):
                start = time.monotonic()
                try:
                    answer = session.post(f"{url}{path}", data=data, timeout=CLIENT_TIMEOUT_S,
                                          headers={"Content-Type": "image/tiff"})  # fmt: skip
                    status: int | str = answer.status_code
                except requests.RequestException as error:
                    status = type(error).__name__
                outcomes.append(Outcome(start, time.monotonic() - start, status))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "clients": clients,
        "requests": len(outcomes),
        "answers": dict(Counter(str(outcome.status) for outcome in outcomes)),
        "seconds": round(time.monotonic() - started, 1),
        "rss_mb": {"before": round(before / 1024), "peak": round(status_kib(worker, "VmHWM:") / 1024)},
        "worker_survived": status_kib(worker, "VmRSS:") > 0,
    }


def worst_case_run(bundle: str, env: dict, log_path: str, clients: int, rounds: int = 3) -> dict:
    """worst_case against one worker started with `env` (THREADS = `clients` unless set), the image at its
    MAX_IMAGE_PIXELS; plus the ceiling docs/security.md states for it."""
    env = {"THREADS": clients, **env}
    settings = load_settings({k: str(v) for k, v in env.items()}, {"MODEL_PATH": bundle})
    data = most_expensive_image(settings.max_image_pixels)
    with open(log_path, "ab") as log, serving({"MODEL_PATH": bundle, **env}, log) as (server, url):
        (worker,) = worker_pids(server.pid)
        result = worst_case(url, worker, data, clients, rounds)
    result["ceiling_mb"] = round(result["rss_mb"]["before"] + memory_ceiling(settings, int(env["THREADS"])) / 2**20)
    return result


def memory_ceiling(settings: Settings, threads: int) -> int:
    """Bytes a worker may grow by with every thread busy (docs/security.md): DECODE_BUDGET_MB of decoded pixels,
    plus per thread up to three copies of a MAX_UPLOAD_MB body and 16 MB of working buffers."""
    return settings.decode_budget_bytes + threads * (3 * settings.max_upload_bytes + 16 * 2**20)
