"""Benchmarks. Serving (default): throughput and latency percentiles of N concurrent clients posting a
real JPEG to /predict. Model (--mode model): training-step and inference images/s of an architecture.

Against a running server:
    python scripts/benchmark.py --url http://127.0.0.1:5000 --concurrency 16 --requests 400
Start the server itself (canonical gunicorn command, free port), micro-batched vs one forward per request:
    python scripts/benchmark.py --spawn --model models/pet_classifier.pt --compare-naive
Training and inference throughput (forward + backward + AdamW step; inference under inference_mode):
    python scripts/benchmark.py --mode model --arch resnet50 --image-size 224 --batch-size 16 --device auto
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

import _path  # noqa: F401  (repository root on sys.path)
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
    parser.add_argument("--mode", choices=("serve", "model"), default="serve", help="what to measure")
    model = parser.add_argument_group("--mode model")
    model.add_argument("--arch", nargs="+", default=["resnet50"], help="architectures to measure")
    model.add_argument("--image-size", type=int, nargs="+", default=[224], help="square input sizes")
    model.add_argument("--batch-size", type=int, default=16, help="images per step")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    model.add_argument("--amp", default="auto", help="auto (bf16 on GPU, none on CPU) | bf16 | fp16 | none")
    model.add_argument("--seconds", type=float, default=10.0, help="measuring time per phase")
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
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}: {workers} ready worker(s) not seen after {timeout}s")


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
            wait_ready(url, process, args.workers)
            yield url
        finally:
            process.terminate()
            process.wait(60)


def _rate(step, batch_size: int, seconds: float, sync) -> float:
    """Images/s of `step` over at least `seconds` (and 3 steps), after 2 unmeasured steps."""
    step(), step()
    sync()
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        step()
        count += 1
    sync()
    return round(batch_size * count / (time.perf_counter() - start), 1)


def model_throughput(arch: str, size: int, args) -> dict:
    """Training-step and inference images/s of a fresh PetClassifier(arch) on random data."""
    import torch  # only this mode needs torch in the benchmark process

    from models.distributed import resolve_device
    from models.engine import Runtime, make_scaler, resolve_amp
    from models.pet_classifier import PetClassifier

    device = resolve_device(args.device)
    runtime = Runtime(device, amp=resolve_amp(args.amp, device), channels_last=device.type == "cuda")
    torch.manual_seed(0)
    model = PetClassifier(10, arch=arch).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_scaler(runtime)
    images, labels = runtime.to_device(
        torch.randn(args.batch_size, 3, size, size), torch.randint(0, 10, (args.batch_size,))
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step():
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def infer_step():
        with torch.inference_mode(), runtime.autocast():
            model(images)

    model.train()
    train = _rate(train_step, args.batch_size, args.seconds, sync)
    model.eval()
    infer = _rate(infer_step, args.batch_size, args.seconds, sync)
    return {
        "arch": arch,
        "image_size": size,
        "batch_size": args.batch_size,
        "device": str(device),
        "amp": runtime.amp,
        "train_images_per_s": train,
        "inference_images_per_s": infer,
    }


def main(args) -> list[dict]:
    if args.mode == "model":
        return report([model_throughput(arch, size, args) for arch in args.arch for size in args.image_size], args)
    data = args.image.read_bytes()
    results = []
    if not args.spawn:
        results.append({"server": args.url, **measure(args.url, args, data)})
    else:
        sizes = [args.max_batch_size] + ([1] if args.compare_naive else [])
        for size in sizes:
            with spawned(args, size) as url:
                results.append({"server": f"spawned MAX_BATCH_SIZE={size}", **measure(url, args, data)})
    return report(results, args)


def report(results: list[dict], args) -> list[dict]:
    """Print one JSON line per result; also write them all to --json when given."""
    for result in results:
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
