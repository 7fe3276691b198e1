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
from pathlib import Path

from models.bundle import DEFAULT_BUNDLE_PATH

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT / "tests" / "data" / "chelsea.jpg"


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="server to measure (ignored with --spawn)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="JPEG to post")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=400, help="measured requests in total")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests first")
    parser.add_argument("--spawn", action="store_true", help="start the server with the canonical command")
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH))
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


def serving(args) -> list[dict]:
    """Measure --url, or servers started here (batched, and MAX_BATCH_SIZE=1 with --compare-naive)."""
    from app.harness import measure, spawned

    data = args.image.read_bytes()
    if not args.spawn:
        return [{"server": args.url, **measure(args.url, data, args.concurrency, args.requests, args.warmup)}]
    results = []
    for size in [args.max_batch_size] + ([1] if args.compare_naive else []):
        env = {"MODEL_PATH": args.model, "THREADS": args.threads, "MAX_BATCH_SIZE": size}
        with spawned({**env, "MAX_BATCH_WAIT_MS": args.max_batch_wait_ms}, args.workers) as url:
            result = measure(url, data, args.concurrency, args.requests, args.warmup)
            results.append({"server": f"spawned MAX_BATCH_SIZE={size}", **result})
    return results


def model(args) -> list[dict]:
    """Training and inference throughput of every --arch at every --image-size."""
    from models.training.throughput import model_throughput

    return [
        model_throughput(arch, size, args.batch_size, args.device, args.amp, args.seconds)
        for arch in args.arch
        for size in args.image_size
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the chosen mode; print one JSON line per result and write them all to --json when given."""
    args = get_args_parser().parse_args(argv)
    results = model(args) if args.mode == "model" else serving(args)
    for result in results:
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
