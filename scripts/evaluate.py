"""Evaluate a model bundle (or an ensemble) on labelled images: accuracy, per-class precision/recall/F1,
confusion matrix, calibration (15-bin ECE before and after the temperature, reliability diagram), the share
flagged unknown, and with --tta flip the same scores with test-time augmentation.

DIR is an ImageFolder root (DIR/<class>/*.jpg); when DIR/val exists, DIR/val is evaluated instead.
Images go through the bundle's own eval transform, decoded exactly as serving decodes them.
"""

from __future__ import annotations

import argparse
import sys

from models.bundle import BundleError
from models.loader import BACKENDS, PRECISIONS
from models.predictor import TTA_MODES
from models.training.config import flag_message
from models.training.evaluation import MODEL_HELP, default_workers, evaluate_bundle, model_paths, summary


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--model",
        action="extend",
        nargs="+",
        help=MODEL_HELP,
    )
    parser.add_argument("--data-dir", required=True, help="ImageFolder root, or a folder with val/ inside")
    parser.add_argument("--out", default="reports/evaluation", help="folder for the report and plots")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=default_workers(), help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="as PRECISION serves it")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="as BACKEND serves it (auto: ONNX "
                        "Runtime on the CPU where the bundle's graph exists)")  # fmt: skip
    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation (flip: + mirror)")
    parser.add_argument("--unknown-dir", help="images of none of the classes: report the share flagged unknown")
    parser.add_argument("--noise", type=int, default=0, help="also report the share of N random-noise images flagged")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, evaluate, print the summary."""
    args = get_args_parser().parse_args(argv)
    models = model_paths(args.model)
    try:
        report = evaluate_bundle(
            models, args.data_dir, args.out, args.batch_size, args.workers, args.device, args.precision, args.tta,
            args.unknown_dir, args.noise, args.backend,
        )  # fmt: skip
    except (BundleError, ValueError) as error:
        sys.exit(f"error: {flag_message(str(error), ('device', 'precision', 'backend', 'data_dir'))}")
    print(summary(report, args.out))


if __name__ == "__main__":
    main()
