"""Benchmarks. Compare (default): in one run, the raw model limit (in-process forward on preprocessed tensors, same
threads, precision and batch size), the real service (canonical gunicorn command) under closed-loop load at each
concurrency, the same service with MAX_BATCH_SIZE=1, and the naive pattern (tools/naive_server.py: plain Flask, one
fp32 forward per request); writes benchmark.json, benchmark.md and benchmark.png under --out.

    python -m scripts.benchmark --untrained resnet50                     # the issue's reference: ResNet-50, 224 px
    python -m scripts.benchmark --model models/pet_classifier.pt --precision fp32 int8 --concurrency 1 8 32
Against a running server (--mode serve), and training/inference images/s of an architecture (--mode model):
    python -m scripts.benchmark --mode serve --url http://127.0.0.1:5000 --concurrency 16 --seconds 20
    python -m scripts.benchmark --mode model --arch resnet50 --image-size 224 --batch-size 16 --device auto
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from models.paths import DEFAULT_BUNDLE_PATH

try:
    import tools  # noqa: F401  (the repository's measurement tools: not packaged, importable from the root)
except ModuleNotFoundError:
    sys.exit("scripts/benchmark.py uses the repository's tools/ folder: run it from the repository root as "
             "python -m scripts.benchmark")

KINDS = ("raw", "service", "unbatched", "naive")  # tools.benchmark.KINDS, without importing torch for --help

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT / "tests" / "data" / "rocket.jpg"  # a 640x427 camera JPEG


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("compare", "serve", "model"), default="compare", help="what to measure")
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH), help="bundle")
    parser.add_argument("--untrained", metavar="ARCH", help="time an untrained ARCH bundle at 224 px (and its int8)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="JPEG every client posts")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each point")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmark"), help="where reports go (compare)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file (serve, model)")
    serve = parser.add_argument_group("servers (compare)")
    serve.add_argument("--precision", nargs="+", default=["fp32"], help="fp32 | bf16 | int8 (raw and service)")
    serve.add_argument("--max-batch-size", type=int, default=16, help="MAX_BATCH_SIZE (and the raw batch)")
    serve.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="MAX_BATCH_WAIT_MS")
    serve.add_argument("--threads", type=int, help="THREADS per worker (default: the service's)")
    serve.add_argument("--torch-threads", type=int, help="TORCH_THREADS (default: the service's)")
    serve.add_argument("--backend", nargs="+", default=["auto"], choices=("auto", "torch", "onnxruntime"),
                       help="BACKEND of the services (auto torch: ONNX Runtime's service beside PyTorch's); the raw "
                       "limit runs on every runtime")  # fmt: skip
    serve.add_argument("--systems", nargs="+", default=list(KINDS), choices=KINDS, help="which systems run")
    serve.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE", help="extra environment for every system")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="server to load (serve)")
    model = parser.add_argument_group("--mode model")
    model.add_argument("--arch", nargs="+", default=["resnet50"], help="architectures to measure")
    model.add_argument("--image-size", type=int, nargs="+", default=[224], help="square input sizes")
    model.add_argument("--batch-size", type=int, default=16, help="images per step")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    model.add_argument("--amp", default="auto", help="auto (bf16 on GPU, none on CPU) | bf16 | fp16 | none")
    return parser


def compare(args) -> dict:
    """The side-by-side run."""
    from tools.benchmark import BenchmarkConfig, run, untrained_bundle

    if args.untrained:
        path = args.out / f"untrained-{args.untrained}-224.pt"
        args.model = untrained_bundle(args.untrained, path, str(args.image), int8="int8" in args.precision)
    config = BenchmarkConfig(
        model=args.model,
        image=str(args.image),
        out=str(args.out),
        concurrencies=tuple(args.concurrency),
        seconds=args.seconds,
        warmup_s=args.warmup,
        precisions=tuple(args.precision),
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        threads=args.threads,
        torch_threads=args.torch_threads,
        extra_env=dict(item.split("=", 1) for item in args.env),
        systems=tuple(args.systems),
        backends=tuple(args.backend),
    )
    report = run(config)
    print((args.out / "benchmark.md").read_text())
    return report


def serving(args) -> list[dict]:
    """Closed-loop load against --url at each --concurrency."""
    from tools.loadgen import closed_loop

    data = args.image.read_bytes()
    return [closed_loop(args.url, data, c, args.seconds, args.warmup, observe=True) for c in args.concurrency]


def model(args) -> list[dict]:
    """Training and inference throughput of every --arch at every --image-size."""
    from models.training.throughput import model_throughput

    return [
        model_throughput(arch, size, args.batch_size, args.device, args.amp, args.seconds)
        for arch in args.arch
        for size in args.image_size
    ]


def main(argv: list[str] | None = None):
    """Run the chosen mode; serve and model print one JSON line per result (and write --json)."""
    args = get_args_parser().parse_args(argv)
    if args.mode == "compare":
        return compare(args)
    results = model(args) if args.mode == "model" else serving(args)
    for result in results:
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
