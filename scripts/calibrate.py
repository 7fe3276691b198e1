"""Calibrate an existing bundle without retraining: fit the temperature and the unknown-input detector on the
validation images of DIR (DIR/val, or the same seeded split training makes) and write the bundle.

Training already does this after its last epoch; use this for older (version-1) bundles, or to try another
--ood-score. Without --output the bundle is rewritten in place (atomically).
"""

from __future__ import annotations

import argparse
import sys

from models.bundle import BundleError
from models.ood import SCORES
from models.training.calibration import calibrate_folder
from models.training.config import TrainConfig, flag_message
from models.training.evaluation import model_paths


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="the bundle; None = $MODEL_PATH, else the default bundle")
    parser.add_argument("--data-dir", required=True, help="the training data: DIR/train + DIR/val, or class folders")
    parser.add_argument("--output", help="where to write the calibrated bundle; None = rewrite --model")
    parser.add_argument(
        "--ood-score", choices=("auto", *SCORES), default="auto",
        help="unknown-input score; auto = the bundle's own (or, without one, what its training taught)",
    )  # fmt: skip
    parser.add_argument("--val-split", type=float, default=TrainConfig.val_split, help="as in training")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="as in training")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, calibrate, print the result."""
    args = get_args_parser().parse_args(argv)
    model = model_paths([args.model] if args.model else None)[0]
    try:
        calibration = calibrate_folder(
            model, args.data_dir, args.output, args.ood_score, device=args.device, val_split=args.val_split,
            seed=args.seed,
        )  # fmt: skip
    except (BundleError, ValueError) as error:
        sys.exit(f"error: {flag_message(str(error), ('device', 'data_dir'))}")
    print(
        f"temperature {calibration['temperature']:.4f}; 15-bin ECE {calibration['ece_before']:.4f} -> "
        f"{calibration['ece_after']:.4f} on {calibration['images']} validation images; unknown-input score "
        f"{calibration['ood_score']}; wrote {args.output or model}"
    )


if __name__ == "__main__":
    main()
