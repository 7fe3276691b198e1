"""Offline evaluation of a bundle on labelled images: accuracy, per-class scores, confusion matrix."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from models.bundle import load_model
from models.runtime import DeviceError, Runtime, resolve_amp, resolve_device
from models.training.data import DataError, ImageList, folder_samples, make_loader, scan
from models.training.engine import evaluate, progress_enabled
from models.training.reporting import classification_report, plot_confusion, write_json
from models.transforms import eval_transform


def default_workers() -> int:
    """Data-loader processes for offline inference."""
    return min(4, os.cpu_count() or 1)


def inference_setup(model_path: str | os.PathLike, device: str = "auto", amp: str = "none"):
    """(model in eval mode, bundle, runtime) for offline inference; SettingError-style messages name the setting."""
    try:
        resolved = resolve_device(device)
        runtime = Runtime(resolved, resolve_amp(amp, resolved))
    except DeviceError as error:
        raise DeviceError(f"`device` {device} / `amp` {amp}: {error}") from error
    model, bundle = load_model(model_path, resolved)
    return model, bundle, runtime


def eval_root(data_dir: str | Path) -> Path:
    """DIR/val when it exists, else DIR itself."""
    root = Path(data_dir)
    return root / "val" if (root / "val").is_dir() else root


def evaluate_bundle(
    model_path: str | os.PathLike,
    data_dir: str | Path,
    out: str | Path,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    amp: str = "none",
) -> dict:
    """Evaluate the bundle on DIR/val (or DIR), write report.json and confusion.png under `out`, return the report."""
    workers = default_workers() if workers is None else workers
    model, bundle, runtime = inference_setup(model_path, device, amp)
    root = eval_root(data_dir)
    samples, _, skipped = scan(folder_samples(root, bundle.class_names), workers=max(workers, 2))
    if not samples:
        raise DataError(f"no readable images under {root}")
    dataset = ImageList(samples, eval_transform(bundle.preprocess), min_size=bundle.preprocess["resize"])
    loader = make_loader(dataset, batch_size, workers, pin=runtime.device.type == "cuda")
    num_classes = len(bundle.class_names)
    result = evaluate(model, loader, nn.CrossEntropyLoss(), runtime, num_classes, progress=progress_enabled(True))
    report = classification_report(result["confusion"], bundle.class_names, result["loss"])
    report.update(model=str(model_path), version=bundle.version, data_dir=str(root), skipped_images=skipped)
    out = Path(out)
    write_json(out / "report.json", report)
    plot_confusion(result["confusion"], bundle.class_names, out / "confusion.png")
    return report


def summary(report: dict, out: str | Path) -> str:
    """Accuracy and a per-class table, as printed by scripts/evaluate.py."""
    lines = [
        f"{report['data_dir']}: {report['images']} images, accuracy {report['accuracy']:.4f}",
        f"{'class':<24} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}",
    ]
    for name, s in report["per_class"].items():
        lines.append(f"{name:<24} {s['precision']:9.3f} {s['recall']:9.3f} {s['f1']:9.3f} {s['support']:8d}")
    lines += [f"skipped unreadable image {item['path']}: {item['error']}" for item in report["skipped_images"]]
    lines.append(f"wrote {Path(out) / 'report.json'} and {Path(out) / 'confusion.png'}")
    return "\n".join(lines)
