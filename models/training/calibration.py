"""After training: temperature scaling (one scalar minimising validation NLL), the calibration error before and
after it (ECE, 15 bins), and the bundle rewritten with its temperature and its OOD detector."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from models.bundle import load_bundle, save_bundle
from models.graphs import GRAPH_PRECISIONS, carries
from models.loader import load_predictor
from models.runtime import resolve_device
from models.training.agreement import pick
from models.training.data import DataError, ImageList, discover, make_loader
from models.training.engine import collect_outputs
from models.training.export import export_split
from models.training.ood import DEFAULT_SCORE, auto_score, fit_detector
from models.transforms import eval_transform

ECE_BINS = 15
# Temperatures searched (log-spaced bounds): below 0.05 or above 20 means the validation set is degenerate
# (perfectly separable, or labels the model cannot predict at all), and the bound is the honest answer.
T_RANGE = (0.05, 20.0)
_GOLDEN = (math.sqrt(5) - 1) / 2


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature), in float64."""
    return torch.nn.functional.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 80) -> float:
    """The temperature T minimising validation NLL of softmax(logits / T) (golden-section search on log T).

    NLL is convex in 1/T, so it has one minimum along log T and the search finds it. When every image is ranked
    right, there is none: NLL falls towards 0 as T -> 0, and the search's floor (T 0.05) saturated a demo model's
    float32 probabilities to 1.0, unknown scores included. Such a set cannot show over- or under-confidence: T = 1.
    """
    if len(labels) == 0 or bool((logits.argmax(dim=1) == labels).all()):
        return 1.0
    low, high = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - _GOLDEN * (high - low)
            fa = nll(logits, labels, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + _GOLDEN * (high - low)
            fb = nll(logits, labels, math.exp(b))
    return math.exp((low + high) / 2)


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: count, mean confidence and accuracy of the top class (empty bins too)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 goes to bin 0.
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    rows = []
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        rows.append(
            {
                "low": i / bins,
                "high": (i + 1) / bins,
                "count": count,
                "confidence": confidence[mask].double().mean().item() if count else None,
                "accuracy": correct[mask].mean().item() if count else None,
            }
        )
    return rows


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins (15 by default)."""
    rows = reliability(probs, labels, bins)
    total = sum(row["count"] for row in rows)
    if not total:
        return 0.0
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]) / total


def calibration_entry(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fit the temperature on (logits, labels) and report ECE and NLL before and after: the bundle's entry."""
    temperature = fit_temperature(logits, labels)
    before, after = torch.softmax(logits.double(), dim=1), torch.softmax(logits.double() / temperature, dim=1)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, temperature),
        "bins": ECE_BINS,
        "images": len(labels),
    }


def fit_bundle(
    path, val_loader, reference_loader, device: torch.device, score: str = DEFAULT_SCORE, progress=False
) -> dict:
    """Fit the temperature and the OOD detector of the bundle at `path` on validation images; rewrite it atomically.

    `reference_loader` (training images, eval transform) gives the class statistics of feature-distance
    scores; None fits them on the validation images. Returns the calibration entry, plus (not saved) the
    reliability bins before and after the temperature.
    """
    # The logits PyTorch fp32 serves (the one loader, BatchNorm folded); the bundle is rewritten from its own weights.
    loaded = load_predictor(path, device, "fp32", "torch")
    predictor, bundle = loaded.predictor, loaded.ensemble.bundles[0]
    model = bundle.build_model("cpu")
    views, labels = collect_outputs(predictor, val_loader, features=True, progress=progress)
    logits, features = views[0][0].logits.cpu(), views[0][0].features.cpu()
    calibration = calibration_entry(logits, labels)
    reference = None
    if reference_loader is not None and score == "mahalanobis":
        ref_views, ref_labels = collect_outputs(predictor, reference_loader, features=True, progress=progress)
        reference = (ref_views[0][0].features.cpu(), ref_labels)
    ood = fit_detector(score, logits, features, labels, calibration["temperature"], reference)
    metrics = {**bundle.metrics, "ece_before": calibration["ece_before"], "ece_after": calibration["ece_after"]}
    save_bundle(path, model, bundle.class_names, bundle.preprocess, metrics, bundle.training, calibration, ood)
    scaled = logits.double() / calibration["temperature"]
    return {
        **calibration,
        "reliability_before": reliability(torch.softmax(logits.double(), dim=1), labels),
        "reliability_after": reliability(torch.softmax(scaled, dim=1), labels),
    }


def calibrate_folder(
    model_path,
    data_dir,
    output=None,
    score: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    val_split: float = 0.2,
    seed: int = 0,
) -> dict:
    """Fit temperature and OOD detector of an existing bundle on DIR's validation images (as training splits DIR).

    Writes `output` (default: the bundle itself, rewritten atomically); an older bundle becomes the current format.
    `score` "auto" keeps the bundle's detector (kept_score); the calibration entry gains `ood_score`, the one fitted.
    The graphs the bundle carried are made again for the new version (calibrated and measured on DIR's split).
    """
    output = Path(output or model_path)
    if output != Path(model_path):
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path, output)
    bundle = load_bundle(output)
    split = discover(data_dir, val_split, seed)
    if split.class_names != bundle.class_names:
        raise DataError(f"{data_dir} has classes {split.class_names}; the bundle has {bundle.class_names}")
    resolved = resolve_device(device)
    transform, size = eval_transform(bundle.preprocess), bundle.preprocess["resize"]
    val, train = (
        make_loader(ImageList(samples, transform, min_size=size), batch_size, workers)
        for samples in (split.val, split.train)
    )
    score = kept_score(bundle) if score == "auto" else score
    fitted = {**fit_bundle(output, val, train, resolved, score), "ood_score": score}
    carried = tuple(p for p in GRAPH_PRECISIONS if carries(model_path, p))
    if carried:  # a new content hash: the graphs of the old one are not carried over
        export_split(output, (pick(split.train, 300, seed), pick(split.val, 200, seed), split.source), carried)
    return fitted


def kept_score(bundle) -> str:
    """The bundle's own unknown-input score; without a detector (version 1), what its training taught."""
    if bundle.ood:
        return bundle.ood["score"]
    return auto_score(float(bundle.training.get("outlier_exposure") or 0.0))
