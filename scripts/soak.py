"""Soak and reliability runs against servers this script starts itself (canonical command, loopback, free ports).

Overload: N keep-alive clients (default 256) for S seconds (default 120) against one worker; every request must
get exactly one answer (200, 503 with Retry-After, or 504), accepted ones within REQUEST_TIMEOUT_S; reports
worker RSS and how fast latency is back to normal. Reload scenarios, 2 workers under 8 keep-alive clients:
HUP with the same bundle, HUP after replacing the bundle atomically, kill -9 of a worker, max_requests recycling.
Worst case (issue 21): THREADS clients at once, each posting the costliest image MAX_IMAGE_PIXELS allows (a
deflated float32 TIFF) --worst-rounds times, to one worker: every answer 200/413/503/504, the worker alive, its
peak resident memory under the ceiling docs/security.md states.

    python -m scripts.soak --model models/pet_classifier.pt                 # both (about 4 minutes)
    python -m scripts.soak --model models/pet_classifier.pt --only reload --json soak.json
    python -m scripts.soak --model models/pet_classifier.pt --only worst-case --threads 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from models.paths import DEFAULT_BUNDLE_PATH

try:
    import tools  # noqa: F401  (the repository's measurement tools: not packaged, importable from the root)
except ModuleNotFoundError:
    sys.exit("scripts/soak.py uses the repository's tools/ folder: run it from the repository root as "
             "python -m scripts.soak")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT / "tests" / "data" / "chelsea.jpg"


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH), help="bundle to serve")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="JPEG the clients post")
    parser.add_argument("--only", choices=("overload", "reload", "worst-case"), help="run one part only")
    parser.add_argument("--clients", type=int, default=256, help="overload: concurrent keep-alive clients")
    parser.add_argument("--seconds", type=float, default=120, help="overload: how long")
    parser.add_argument("--recycle-seconds", type=float, default=20, help="reload: max_requests recycling run")
    parser.add_argument("--threads", type=int, default=16, help="THREADS per worker")
    parser.add_argument("--request-timeout", type=float, default=10, help="REQUEST_TIMEOUT_S")
    parser.add_argument("--worst-rounds", type=int, default=3, help="worst-case: requests per client")
    parser.add_argument("--log", type=Path, default=Path("soak-server.log"), help="the servers' combined log")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen parts; print one JSON line per scenario and return them all."""
    from tools import soak

    args = get_args_parser().parse_args(argv)
    data = args.image.read_bytes()
    env = {"THREADS": args.threads, "REQUEST_TIMEOUT_S": args.request_timeout}
    results = {}
    if args.only in (None, "overload"):
        results["overload"] = soak.overload(args.model, data, env, str(args.log), args.clients, args.seconds)
    if args.only in (None, "reload"):
        with tempfile.TemporaryDirectory() as workdir:
            reloads = soak.reload_scenarios(args.model, data, workdir, env, str(args.log), args.recycle_seconds)
        results.update(reloads)
    if args.only in (None, "worst-case"):
        results["worst_case"] = soak.worst_case_run(args.model, env, str(args.log), args.threads, args.worst_rounds)
    for name, result in results.items():
        print(json.dumps({"scenario": name, **result}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
