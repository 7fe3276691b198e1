"""int8 for x86 CPUs: calibrate a bundle's network on a few hundred training images (post-training static
quantization, PyTorch's FX flow, x86 backend), write it into the bundle (its `torch/int8` runtime, which
PRECISION=int8 with BACKEND=torch reads), and record in it each precision's (fp32, bf16, int8) top-1 agreement with
fp32 on held-out images, each predictor loaded exactly as BACKEND=torch serves it.

The data set is the one the bundle was trained on: DIR/train + DIR/val, or DIR/<class>/ split with the bundle's
own val_split and seed, so held-out images are ones the weights never saw.

    python scripts/quantize.py --model models/pet_classifier.pt --data-dir data/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from models.bundle import BundleError
from models.paths import DEFAULT_BUNDLE_PATH
from models.training.config import flag_message
from models.training.evaluation import default_workers
from models.training.quantization import quantize_bundle


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH), help="bundle")
    parser.add_argument("--data-dir", required=True, help="the bundle's training data (ImageFolder layout)")
    parser.add_argument("--calibration-images", type=int, default=300, help="training images to calibrate on")
    parser.add_argument("--holdout-images", type=int, default=200, help="held-out images to measure agreement on")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=default_workers(), help="data-loader processes")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse, quantize, print the report as JSON."""
    args = get_args_parser().parse_args(argv)
    try:
        report = quantize_bundle(
            args.model,
            args.data_dir,
            args.calibration_images,
            args.holdout_images,
            args.batch_size,
            args.workers,
        )
    except (BundleError, ValueError) as error:
        sys.exit(f"error: {flag_message(str(error), ('data_dir',))}")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
