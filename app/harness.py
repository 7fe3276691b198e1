"""Run the real service from outside, as users do: start it with the canonical command, wait, load it.

Used by scripts/benchmark.py and by the tests; the service itself never imports this module.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SERVER_COMMAND = ("-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()")


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(env: dict, log_file) -> tuple[subprocess.Popen, str]:
    """Start `gunicorn -c gunicorn.conf.py 'app:create_app()'` on a free loopback port; returns (process, url)."""
    port = free_port()
    environ = {**os.environ, "PORT": str(port), "BIND": f"127.0.0.1:{port}", **{k: str(v) for k, v in env.items()}}
    process = subprocess.Popen(
        [sys.executable, *SERVER_COMMAND], cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT
    )
    return process, f"http://127.0.0.1:{port}"


def ready_workers(url: str) -> int:
    """Live, warmed-up workers behind `url`: the petclf_model_info gauge summed over its label sets."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return int(
        sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("petclf_model_info{"))
    )


def wait_ready(url: str, process: subprocess.Popen | None = None, workers: int = 1, timeout: float = 180) -> None:
    """Poll until /readyz is 200 and `workers` workers have warmed up; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200 and ready_workers(url) >= workers:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet; warming up (connected, no answer)
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}: {workers} ready worker(s) not seen after {timeout}s")


@contextmanager
def serving(env: dict, log_file, workers: int = 1):
    """A server started with the canonical command and `env`, ready on entry: (process, url); SIGTERM on exit."""
    process, url = spawn_server({"WEB_CONCURRENCY": workers, **env}, log_file)
    try:
        wait_ready(url, process, workers)
        yield process, url
    finally:
        process.terminate()
        process.wait(90)


@contextmanager
def spawned(env: dict, workers: int = 1, log_path: str | os.PathLike = os.devnull):
    """`serving`, logging to `log_path`; yields the url."""
    with open(log_path, "wb") as log_file, serving(env, log_file, workers) as (_, url):
        yield url


def _client(url: str, data: bytes, count: int, latencies: list, errors: list) -> None:
    with requests.Session() as session:
        for _ in range(count):
            start = time.perf_counter()
            try:
                response = session.post(f"{url}/predict", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
                ok = response.status_code == 200
            except requests.RequestException:
                ok = False
            (latencies if ok else errors).append(time.perf_counter() - start)


def run_load(url: str, data: bytes, concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` keep-alive clients; throughput and latency percentiles in ms."""
    latencies, errors = [], []
    shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=_client, args=(url, data, n, latencies, errors)) for n in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": total,
        "errors": len(errors),
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(cuts[49] * 1000, 1),
        "p90_ms": round(cuts[89] * 1000, 1),
        "p99_ms": round(cuts[98] * 1000, 1),
    }


def batch_size_mean(url: str) -> float | None:
    """Mean images per forward pass so far, from /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    values = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("petclf_batch_size_"))
    count = float(values.get("petclf_batch_size_count", 0))
    return round(float(values["petclf_batch_size_sum"]) / count, 2) if count else None


def measure(url: str, data: bytes, concurrency: int, total: int, warmup: int = 0) -> dict:
    """Unmeasured warm-up requests, then `run_load`, plus the server's mean batch size."""
    if warmup:
        run_load(url, data, concurrency, warmup)
    result = run_load(url, data, concurrency, total)
    result["mean_batch_size"] = batch_size_mean(url)
    return result
