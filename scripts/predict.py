"""Offline batch prediction with a model bundle (or an ensemble): predicted class, calibrated confidence,
unknown flag, OOD score and top-k for each image file.

Arguments are image files or folders (searched recursively). Unreadable files get an `error` instead of a
prediction; they never stop the run.
"""

from __future__ import annotations

import argparse
import sys

from models.bundle import BundleError
from models.loader import BACKENDS, PRECISIONS
from models.predictor import TTA_MODES
from models.training.config import flag_message
from models.training.evaluation import MODEL_HELP, default_workers, model_paths
from models.training.prediction import FORMATS, predict_files, render, write_output


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    # One value per flag: nargs="+" swallowed the inputs that follow (`--model m.pt photos/` had no inputs).
    parser.add_argument("--model", action="append", help=MODEL_HELP)
    parser.add_argument("--format", choices=FORMATS, default="csv", help="output format")
    parser.add_argument("--output", default="-", help="output file ('-' = stdout)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=default_workers(), help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="as PRECISION serves it")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="as BACKEND serves it (auto: ONNX "
                        "Runtime on the CPU where the bundle's graph exists)")  # fmt: skip
    parser.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation (flip: + mirror)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, predict every input, write the rows."""
    args = get_args_parser().parse_args(argv)
    models = model_paths(args.model)
    try:
        rows = predict_files(
            models, args.inputs, args.top_k, args.batch_size, args.workers, args.device, args.precision, args.tta,
            args.backend,
        )
    except (BundleError, ValueError) as error:
        sys.exit(f"error: {flag_message(str(error), ('device', 'precision', 'backend'))}")
    write_output(render(rows, args.format), args.output)


if __name__ == "__main__":
    main()
