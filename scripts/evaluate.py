"""Evaluate a model bundle on labelled images: accuracy, per-class precision/recall/F1, confusion matrix.

DIR is an ImageFolder root (DIR/<class>/*.jpg); when DIR/val exists, DIR/val is evaluated instead.
Images go through the bundle's own eval transform, decoded exactly as serving decodes them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _path  # noqa: F401  (repository root on sys.path)
import torch
from torch import nn

from models.bundle import BundleError, load_model
from models.data import DataError, ImageList, folder_samples, make_loader, scan
from models.distributed import resolve_device
from models.engine import AMP_CHOICES, Runtime, evaluate, progress_enabled, resolve_amp
from models.reporting import classification_report, plot_confusion, write_json
from models.transforms import eval_transform


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", "models/pet_classifier.pt"), help="bundle")
    parser.add_argument("--data-dir", required=True, help="ImageFolder root, or a folder with val/ inside")
    parser.add_argument("--out", default="reports/evaluation", help="folder for report.json and confusion.png")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision for inference")
    return parser


def eval_root(data_dir: str | Path) -> Path:
    """DIR/val when it exists, else DIR itself."""
    root = Path(data_dir)
    return root / "val" if (root / "val").is_dir() else root


def main(args: argparse.Namespace) -> dict:
    """Evaluate, write report.json and confusion.png under --out, return the report."""
    device = resolve_device(args.device)
    runtime = Runtime(device, resolve_amp(args.amp, device), progress=progress_enabled(True))
    model, bundle = load_model(args.model, device)
    root = eval_root(args.data_dir)
    samples, _, skipped = scan(folder_samples(root, bundle.class_names), workers=max(args.workers, 2))
    if not samples:
        raise DataError(f"no readable images under {root}")
    dataset = ImageList(samples, eval_transform(bundle.preprocess), min_size=bundle.preprocess["resize"])
    loader = make_loader(dataset, args.batch_size, args.workers, pin=device.type == "cuda")
    result = evaluate(model, loader, nn.CrossEntropyLoss(), runtime, len(bundle.class_names))
    report = classification_report(result["confusion"], bundle.class_names, result["loss"])
    report.update(model=str(args.model), version=bundle.version, data_dir=str(root), skipped_images=skipped)
    out = Path(args.out)
    write_json(out / "report.json", report)
    plot_confusion(result["confusion"], bundle.class_names, out / "confusion.png")
    print_summary(report, out)
    return report


def print_summary(report: dict, out: Path) -> None:
    """Accuracy and a per-class table on stdout."""
    print(f"{report['data_dir']}: {report['images']} images, accuracy {report['accuracy']:.4f}")
    print(f"{'class':<24} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, s in report["per_class"].items():
        print(f"{name:<24} {s['precision']:9.3f} {s['recall']:9.3f} {s['f1']:9.3f} {s['support']:8d}")
    for item in report["skipped_images"]:
        print(f"skipped unreadable image {item['path']}: {item['error']}")
    print(f"wrote {out / 'report.json'} and {out / 'confusion.png'}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        main(get_args_parser().parse_args())
    except (BundleError, DataError) as error:
        sys.exit(f"error: {error}")
