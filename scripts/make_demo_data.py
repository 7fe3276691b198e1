"""Write the small deterministic demo dataset: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg."""

import argparse

from models.training.demo_data import CLASSES, PER_CLASS, make_demo_data


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (ImageFolder layout)")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="training images per class")
    parser.add_argument(
        "--val-per-class", type=int, default=None, help="validation images per class (default: per-class / 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse, write the files."""
    args = get_args_parser().parse_args(argv)
    out = make_demo_data(args.out, per_class=args.per_class, val_per_class=args.val_per_class, seed=args.seed)
    print(f"wrote demo data for classes {list(CLASSES)} to {out}")


if __name__ == "__main__":
    main()
