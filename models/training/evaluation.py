"""Offline evaluation of a bundle (or an ensemble) on labelled images: accuracy, per-class scores, confusion
matrix, calibration (ECE before and after the temperature, reliability diagram), unknown rate, TTA."""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Dataset

from models.ensemble import Ensemble
from models.loader import backend_of, load_predictor
from models.paths import DEFAULT_BUNDLE_PATH
from models.predictor import MemberOutput, Output, Predictor, average
from models.runtime import DeviceError
from models.training.calibration import ECE_BINS, expected_calibration_error, reliability
from models.training.data import DataError, ImageList, folder_samples, image_files, make_loader, scan
from models.training.demo_data import noise_image
from models.training.engine import collect_outputs, progress_enabled
from models.training.reporting import classification_report, plot_confusion, plot_reliability, write_json
from models.transforms import eval_transform

MODEL_HELP = (
    f"bundle; several (--model a.pt --model b.pt, or a.pt,b.pt) = an ensemble (default: $MODEL_PATH, "
    f"else {DEFAULT_BUNDLE_PATH})"
)


def model_paths(values: list[str] | None) -> list[str]:
    """The --model values given, else MODEL_PATH from the environment, else the default bundle."""
    return list(values or [os.environ.get("MODEL_PATH") or DEFAULT_BUNDLE_PATH])


def default_workers() -> int:
    """Data-loader processes for offline inference."""
    return min(4, os.cpu_count() or 1)


def inference_setup(
    model_paths, device: str = "auto", precision: str = "fp32", backend: str = "auto"
) -> tuple[Predictor, Ensemble]:
    """(predictor, ensemble) for offline inference through the serving loader: one bundle or several (a list, or
    'a.pt,b.pt'), at the precision and on the runtime serving would use, so what is evaluated is what is served."""
    try:
        loaded = load_predictor(model_paths, device, precision, backend, threads=torch.get_num_threads())
    except DeviceError as error:
        raise DeviceError(f"`device` {device} / `precision` {precision}: {error}") from error
    return loaded.predictor, loaded.ensemble


def eval_root(data_dir: str | Path) -> Path:
    """DIR/val when it exists, else DIR itself."""
    root = Path(data_dir)
    return root / "val" if (root / "val").is_dir() else root


def served(predictor: Predictor, views: list[list[MemberOutput]], calibrated: bool = True) -> Output:
    """What serving answers for these outputs: each view combined (calibrated or not), views averaged."""
    return average([predictor.combine(view, calibrated) for view in views])


def nll(predictor: Predictor, views: list[list[MemberOutput]], labels: torch.Tensor, calibrated: bool = True) -> float:
    """Mean negative log-likelihood of the averaged probabilities, computed in log space (no underflow)."""
    if not len(labels):
        return 0.0
    picked = []
    for view in views:
        for member, out in zip(predictor.members, view, strict=True):
            logits = out.logits.double().cpu() / (member.temperature if calibrated else 1.0)
            picked.append(torch.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels])
    log_mean = torch.logsumexp(torch.stack(picked), dim=0) - math.log(len(picked))
    return -log_mean.mean().item()


def scores(predictor: Predictor, views: list[list[MemberOutput]], labels: torch.Tensor, calibrated: bool) -> dict:
    """Accuracy, NLL and ECE of the averaged (calibrated or raw) probabilities."""
    output = served(predictor, views, calibrated)
    return {
        "accuracy": (output.probs.argmax(dim=1) == labels).double().mean().item() if len(labels) else 0.0,
        "nll": nll(predictor, views, labels, calibrated),
        "ece": expected_calibration_error(output.probs, labels),
    }


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Rows = true class, columns = predicted."""
    counts = torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).tolist()


def evaluation_report(views: list, labels: torch.Tensor, predictor: Predictor, class_names: list[str]) -> dict:
    """Per-class scores of the served predictions (calibrated, no TTA), calibration, unknown rate, TTA."""
    plain = views[:1]
    answers, raw = served(predictor, plain), served(predictor, plain, calibrated=False)
    confusion = confusion_matrix(answers.probs.argmax(dim=1), labels, len(class_names))
    before, after = scores(predictor, plain, labels, False), scores(predictor, plain, labels, True)
    report = classification_report(confusion, class_names, before["nll"])
    report["calibration"] = {
        "bins": ECE_BINS,
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "nll_before": before["nll"],
        "nll_after": after["nll"],
        "temperatures": [member.temperature for member in predictor.members],
        "reliability_before": reliability(raw.probs, labels),
        "reliability_after": reliability(answers.probs, labels),
    }
    scores_ = [] if answers.ood_scores is None else answers.ood_scores.tolist()
    report["unknown_fraction"] = sum(map(predictor.is_unknown, scores_)) / len(scores_) if scores_ else None
    report["tta"] = {"none": after}
    if len(views) > 1:
        report["tta"]["flip"] = scores(predictor, views, labels, True)
    return report


class NoiseImages(Dataset):
    """`count` deterministic random-noise images through the eval transform, labelled -1."""

    def __init__(self, count: int, preprocess: dict, seed: int = 0):
        self.count, self.seed, self.transform = count, seed, eval_transform(preprocess)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.transform(noise_image(self.seed * 1_000_003 + index)), -1


def unknown_rates(predictor: Predictor, preprocess: dict, loader_for, unknown_dir=None, noise: int = 0) -> dict:
    """The share flagged unknown among a folder of unrelated images (any layout) and among `noise` noise images."""
    sets = {}
    if unknown_dir:
        files, _, _ = scan([(str(path), -1) for path in image_files(Path(unknown_dir))])
        sets[str(unknown_dir)] = ImageList(files, eval_transform(preprocess), min_size=preprocess["resize"])
    if noise:
        sets["random noise"] = NoiseImages(noise, preprocess)
    rates = {}
    for name, dataset in sets.items():
        views, _ = collect_outputs(predictor, loader_for(dataset))
        scores_ = served(predictor, views).ood_scores
        flagged = [predictor.is_unknown(s) for s in scores_.tolist()] if scores_ is not None else []
        rates[name] = {"images": len(dataset), "flagged": sum(flagged) / len(flagged) if flagged else None}
    return rates


def evaluate_bundle(
    model_path,
    data_dir: str | Path,
    out: str | Path,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    tta: str = "none",
    unknown_dir: str | Path | None = None,
    noise: int = 0,
    backend: str = "auto",
) -> dict:
    """Evaluate a bundle (or 'a.pt,b.pt' / a list: an ensemble) on DIR/val (or DIR).

    `unknown_dir` (images of none of the classes) and `noise` (a number of random-noise images) add the share
    of them flagged unknown. Writes report.json, confusion.png and reliability.png under `out`.
    """
    workers = default_workers() if workers is None else workers
    predictor, ensemble = inference_setup(model_path, device, precision, backend)
    root = eval_root(data_dir)
    samples, _, skipped = scan(folder_samples(root, ensemble.class_names), workers=max(workers, 2))
    if not samples:
        raise DataError(f"no readable images under {root}")
    dataset = ImageList(samples, eval_transform(ensemble.preprocess), min_size=ensemble.preprocess["resize"])
    loader_for = partial(
        make_loader, batch_size=batch_size, workers=workers, pin=predictor.runtime.device.type == "cuda"
    )
    views, labels = collect_outputs(predictor, loader_for(dataset), tta, progress=progress_enabled(True))
    report = evaluation_report(views, labels, predictor, ensemble.class_names)
    report["unknown_elsewhere"] = unknown_rates(predictor, ensemble.preprocess, loader_for, unknown_dir, noise)
    report.update(model=str(model_path), version=ensemble.version, data_dir=str(root), skipped_images=skipped,
                  precision=precision, backends=[backend_of(m.model) for m in predictor.members])  # fmt: skip
    out = Path(out)
    write_json(out / "report.json", report)
    plot_confusion(report["confusion_matrix"], ensemble.class_names, out / "confusion.png")
    calibration = report["calibration"]
    plot_reliability(calibration["reliability_before"], calibration["reliability_after"], out / "reliability.png")
    return report


def summary(report: dict, out: str | Path) -> str:
    """Accuracy and a per-class table, as printed by scripts/evaluate.py."""
    lines = [
        f"{report['data_dir']}: {report['images']} images, accuracy {report['accuracy']:.4f}",
        f"{'class':<24} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}",
    ]
    for name, s in report["per_class"].items():
        lines.append(f"{name:<24} {s['precision']:9.3f} {s['recall']:9.3f} {s['f1']:9.3f} {s['support']:8d}")
    calibration = report["calibration"]
    lines.append(
        f"calibration ({calibration['bins']}-bin ECE): {calibration['ece_before']:.4f} before, "
        f"{calibration['ece_after']:.4f} after the temperature {calibration['temperatures']}"
    )
    for mode, result in report["tta"].items():
        lines.append(f"tta {mode}: accuracy {result['accuracy']:.4f}, ECE {result['ece']:.4f}, NLL {result['nll']:.4f}")
    if report["unknown_fraction"] is None:
        lines.append("no unknown-input detector (a version-1 bundle, or an ensemble member without one)")
    else:
        lines.append(f"flagged unknown: {report['unknown_fraction']:.1%} of these images")
        for name, rate in report["unknown_elsewhere"].items():
            lines.append(f"flagged unknown: {rate['flagged']:.1%} of the {rate['images']} images in {name}")
    lines += [f"skipped unreadable image {item['path']}: {item['error']}" for item in report["skipped_images"]]
    written = ", ".join(str(Path(out) / name) for name in ("report.json", "confusion.png", "reliability.png"))
    lines.append(f"wrote {written}")
    return "\n".join(lines)
