"""ONNX Runtime graphs for a bundle, written into it (the file is rewritten atomically; training already does this):
fp32 and int8, each returning the logits and the features OOD scores read, with a dynamic batch axis, tied to the
bundle's content hash. int8 is ONNX Runtime's static quantization (QDQ, per-channel weights) calibrated on training
images; each graph's top-1 agreement with PyTorch fp32 on held-out images is measured and recorded in it (GET /model
shows it). Serving picks them up with BACKEND=auto (the default) on the CPU.

The data set is the one the bundle was trained on: DIR/train + DIR/val, or DIR/<class>/ split with the bundle's
own val_split and seed, so held-out images are ones the weights never saw.

    python scripts/export.py --model models/pet_classifier.pt --data-dir data/demo

A bundle of format 1 or 2 with its graphs (and PyTorch int8 network) beside it becomes one file carrying them:

    python scripts/export.py --model models/pet_classifier.pt --upgrade
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from models.bundle import BundleError
from models.graphs import GRAPH_PRECISIONS
from models.paths import DEFAULT_BUNDLE_PATH
from models.training.config import flag_message
from models.training.evaluation import default_workers
from models.training.export import export_bundle, upgrade_bundle


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH), help="bundle")
    parser.add_argument("--data-dir", help="the bundle's training data (ImageFolder layout); int8 needs it")
    parser.add_argument("--precision", nargs="+", choices=GRAPH_PRECISIONS, default=list(GRAPH_PRECISIONS),
                        help="graphs to write (default: fp32 int8)")  # fmt: skip
    parser.add_argument("--calibration-images", type=int, default=300, help="training images to calibrate on")
    parser.add_argument("--holdout-images", type=int, default=200, help="held-out images to measure agreement on")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=default_workers(), help="data-loader processes")
    parser.add_argument(
        "--upgrade", action="store_true", help="move the graphs and int8 network beside an older bundle into it"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse, export, print the report as JSON."""
    args = get_args_parser().parse_args(argv)
    try:
        report = upgrade_bundle(args.model) if args.upgrade else export_bundle(
            args.model, args.data_dir, tuple(args.precision), args.calibration_images, args.holdout_images,
            args.batch_size, args.workers,
        )  # fmt: skip
    except (BundleError, ValueError) as error:
        sys.exit(f"error: {flag_message(str(error), ('data_dir',))}")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
