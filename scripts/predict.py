"""Offline batch prediction with a model bundle: predicted class, confidence and top-k for each image file.

Arguments are image files or folders (searched recursively). Unreadable files get an `error` instead of a
prediction; they never stop the run.
"""

from __future__ import annotations

import argparse
import os
import sys

from models.bundle import DEFAULT_BUNDLE_PATH, BundleError
from models.runtime import AMP_CHOICES
from models.training.config import flag_message
from models.training.evaluation import default_workers
from models.training.prediction import FORMATS, predict_files, render, write_output


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH), help="bundle")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="output format")
    parser.add_argument("--output", default="-", help="output file ('-' = stdout)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=default_workers(), help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision for inference")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, predict every input, write the rows."""
    args = get_args_parser().parse_args(argv)
    try:
        rows = predict_files(args.model, args.inputs, args.top_k, args.batch_size, args.workers, args.device, args.amp)
    except (BundleError, ValueError) as error:
        sys.exit(f"error: {flag_message(str(error), ('device', 'amp'))}")
    write_output(render(rows, args.format), args.output)


if __name__ == "__main__":
    main()
