"""Offline batch prediction over image files and folders: one row per file, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from models.images import ImageError, load_image
from models.predictor import Output, Predictor, top_k
from models.training.data import image_files, make_loader
from models.training.engine import predict_outputs, progress_enabled
from models.training.evaluation import default_workers, inference_setup
from models.transforms import eval_transform

FORMATS = ("csv", "json")
CSV_FIELDS = ("file", "predicted_class", "confidence", "unknown", "ood_score", "top_k", "error")


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


def rows_for(
    files: list[str], output: Output, errors: list[str], class_names: list[str], k: int, predictor: Predictor
) -> list[dict]:
    """One dict per file: predicted class, confidence, unknown flag, OOD score and top-k, or the error."""
    rows = []
    k = max(1, min(k, len(class_names)))
    for path, row, error in zip(files, output, errors, strict=True):
        top = [] if error else top_k(row.probs[0].tolist(), class_names, k)
        best = top[0] if top else {"label": None, "probability": None}
        score = None if error or row.ood_scores is None else row.ood_scores[0].item()
        rows.append(
            {
                "file": path,
                "predicted_class": best["label"],
                "confidence": best["probability"],
                "unknown": None if error else predictor.is_unknown(score),
                "ood_score": score,
                "top_k": top,
                "error": error or None,
            }
        )
    return rows


def render(rows: list[dict], fmt: str) -> str:
    """JSON list, or CSV with top-k as 'label:prob;label:prob'."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        top = ";".join(f"{t['label']}:{t['probability']:.4f}" for t in row["top_k"])
        writer.writerow({**row, "top_k": top})
    return buffer.getvalue()


def predict_files(
    model_path,
    inputs: list[str],
    k: int = 3,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    tta: str = "none",
    backend: str = "auto",
) -> list[dict]:
    """Predict every input file (folders searched recursively) with a bundle or an ensemble ('a.pt,b.pt' or a list).

    Unreadable files get an `error`, never a crash. Probabilities are calibrated, as served.
    """
    workers = default_workers() if workers is None else workers
    predictor, ensemble = inference_setup(model_path, device, precision, backend)
    files = input_files(inputs)
    loader = make_loader(PredictFiles(files, ensemble.preprocess), batch_size, workers)
    output, errors = predict_outputs(predictor, loader, tta, progress=progress_enabled(True))
    return rows_for(files, output, errors, ensemble.class_names, k, predictor)


def write_output(text: str, output: str) -> None:
    """To stdout for '-', else to the file (parent folders created)."""
    if output == "-":
        print(text, end="")
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)
