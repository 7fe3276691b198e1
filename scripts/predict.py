"""Offline batch prediction with a model bundle: predicted class, confidence and top-k for each image file.

Arguments are image files or folders (searched recursively). Unreadable files get an `error` instead of a
prediction; they never stop the run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import _path  # noqa: F401  (repository root on sys.path)
import torch
from torch.utils.data import Dataset

from models.bundle import BundleError, load_model
from models.data import image_files, make_loader
from models.distributed import resolve_device
from models.engine import AMP_CHOICES, Runtime, predict_probs, progress_enabled, resolve_amp
from models.images import ImageError, load_image
from models.transforms import eval_transform


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--model", default=os.environ.get("MODEL_PATH", "models/pet_classifier.pt"), help="bundle")
    parser.add_argument("--format", choices=["csv", "json"], default="csv", help="output format")
    parser.add_argument("--output", default="-", help="output file ('-' = stdout)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision for inference")
    return parser


def input_files(inputs: list[str]) -> list[str]:
    """Files as given plus image files found under folders, in a stable order."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(str(p) for p in image_files(path))
        else:
            files.append(str(path))
    return files


class PredictFiles(Dataset):
    """(tensor, error message) per file; an unreadable file yields a blank tensor and its error."""

    def __init__(self, files: list[str], preprocess: dict):
        self.files = files
        self.transform = eval_transform(preprocess)
        self.min_size = preprocess["resize"]
        self.blank = torch.zeros(3, preprocess["crop"], preprocess["crop"])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_image(self.files[index], min_size=self.min_size)), ""
        except (OSError, ImageError) as error:
            return self.blank, f"{type(error).__name__}: {error}"


def _row(path: str, top: list[dict], error: str | None = None) -> dict:
    best = top[0] if top else {"class": None, "probability": None}
    return {
        "file": path,
        "predicted_class": best["class"],
        "confidence": best["probability"],
        "top_k": top,
        "error": error,
    }


def rows_for(files: list[str], probs: torch.Tensor, errors: list[str], class_names: list[str], top_k: int):
    """One dict per file: predicted class, confidence and top-k, or the error."""
    rows = []
    k = max(1, min(top_k, len(class_names)))
    for path, p, error in zip(files, probs, errors):
        if error:
            rows.append(_row(path, [], error))
            continue
        values, indices = p.topk(k)
        top = [{"class": class_names[i], "probability": round(v, 6)} for v, i in zip(values.tolist(), indices.tolist())]
        rows.append(_row(path, top))
    return rows


def render(rows: list[dict], fmt: str) -> str:
    """JSON list, or CSV with top-k as 'class:prob;class:prob'."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "predicted_class", "confidence", "top_k", "error"])
    writer.writeheader()
    for row in rows:
        top = ";".join(f"{t['class']}:{t['probability']:.4f}" for t in row["top_k"])
        writer.writerow({**row, "top_k": top})
    return buffer.getvalue()


def main(args: argparse.Namespace) -> list[dict]:
    """Predict every input file; write the rows to --output (or stdout) and return them."""
    device = resolve_device(args.device)
    runtime = Runtime(device, resolve_amp(args.amp, device), progress=progress_enabled(True))
    model, bundle = load_model(args.model, device)
    files = input_files(args.inputs)
    loader = make_loader(PredictFiles(files, bundle.preprocess), args.batch_size, args.workers)
    probs, errors = predict_probs(model, loader, runtime)
    rows = rows_for(files, probs, errors, bundle.class_names, args.top_k)
    text = render(rows, args.format)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        main(get_args_parser().parse_args())
    except BundleError as error:
        sys.exit(f"error: {error}")
