"""Evaluate a model bundle on labelled images: accuracy, per-class precision/recall/F1, confusion matrix.

DIR is an ImageFolder root (DIR/<class>/*.jpg); when DIR/val exists, DIR/val is evaluated instead.
Images go through the bundle's own eval transform, decoded exactly as serving decodes them.
"""

from __future__ import annotations

import argparse
import os
import sys

from models.bundle import DEFAULT_BUNDLE_PATH, BundleError
from models.runtime import AMP_CHOICES
from models.training.config import flag_message
from models.training.evaluation import default_workers, evaluate_bundle, summary


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH), help="bundle")
    parser.add_argument("--data-dir", required=True, help="ImageFolder root, or a folder with val/ inside")
    parser.add_argument("--out", default="reports/evaluation", help="folder for report.json and confusion.png")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=default_workers(), help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision for inference")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, evaluate, print the summary."""
    args = get_args_parser().parse_args(argv)
    try:
        report = evaluate_bundle(
            args.model, args.data_dir, args.out, args.batch_size, args.workers, args.device, args.amp
        )
    except (BundleError, ValueError) as error:
        sys.exit(f"error: {flag_message(str(error), ('device', 'amp', 'data_dir'))}")
    print(summary(report, args.out))


if __name__ == "__main__":
    main()
