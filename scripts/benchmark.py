"""Serving throughput and latency percentiles: N concurrent clients posting a real JPEG to /predict.

Against a running server:
    python scripts/benchmark.py --url http://127.0.0.1:5000 --concurrency 16 --requests 400
Start the server itself (canonical gunicorn command, free port), micro-batched vs one forward per request:
    python scripts/benchmark.py --spawn --model models/pet_classifier.pt --compare-naive
"""

from __future__ import annotations

import argparse
import json
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
DEFAULT_IMAGE = ROOT / "tests" / "data" / "chelsea.jpg"
SERVER_COMMAND = ("-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="server to measure (ignored with --spawn)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="JPEG to post")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=400, help="measured requests in total")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests first")
    parser.add_argument("--spawn", action="store_true", help="start the server with the canonical command")
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", "models/pet_classifier.pt"))
    parser.add_argument("--workers", type=int, default=1, help="WEB_CONCURRENCY of spawned servers")
    parser.add_argument("--threads", type=int, default=16, help="THREADS (per worker) of spawned servers")
    parser.add_argument("--max-batch-size", type=int, default=16, help="MAX_BATCH_SIZE of the batched server")
    parser.add_argument("--max-batch-wait-ms", type=float, default=5, help="MAX_BATCH_WAIT_MS of spawned servers")
    parser.add_argument("--compare-naive", action="store_true", help="with --spawn: also run MAX_BATCH_SIZE=1")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


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


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Poll /readyz until 200; raise if the process exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


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


def measure(url: str, args, data: bytes) -> dict:
    if args.warmup:
        run_load(url, data, args.concurrency, args.warmup)
    result = run_load(url, data, args.concurrency, args.requests)
    result["mean_batch_size"] = batch_size_mean(url)
    return result


@contextmanager
def spawned(args, max_batch_size: int):
    env = {
        "MODEL_PATH": args.model,
        "WEB_CONCURRENCY": args.workers,
        "THREADS": args.threads,
        "MAX_BATCH_SIZE": max_batch_size,
        "MAX_BATCH_WAIT_MS": args.max_batch_wait_ms,
    }
    with open(os.devnull, "wb") as log_file:
        process, url = spawn_server(env, log_file)
        try:
            wait_ready(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(60)


def main(args) -> list[dict]:
    data = args.image.read_bytes()
    results = []
    if not args.spawn:
        results.append({"server": args.url, **measure(args.url, args, data)})
    else:
        sizes = [args.max_batch_size] + ([1] if args.compare_naive else [])
        for size in sizes:
            with spawned(args, size) as url:
                results.append({"server": f"spawned MAX_BATCH_SIZE={size}", **measure(url, args, data)})
    for result in results:
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
