"""Agreement with fp32 on held-out images: the bundle's own split of its data set (training images calibrate,
held-out ones measure), and candidate predictors compared with the fp32 reference, all built by the loader."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from models.predictor import Predictor, concat
from models.quantize import RECOMMENDED_AGREEMENT
from models.training.data import DataError, ImageList, Sample, discover, make_loader
from models.transforms import eval_transform

LOADER_LOG = logging.getLogger("models.loader")


def pick(samples: list[Sample], count: int, seed: int) -> list[Sample]:
    """Up to `count` samples, drawn without replacement with a fixed seed (all of them when there are fewer)."""
    if count >= len(samples):
        return list(samples)
    return sorted(random.Random(seed).sample(samples, count))


def bundle_split(bundle, data_dir, calibration_images: int, holdout_images: int) -> tuple[list, list, str]:
    """(calibration, held-out samples, source) from the split the bundle's training made (its val_split and seed),
    so held-out images are ones its weights never saw; raises DataError when the classes differ."""
    seed = int(bundle.training.get("seed", 0))
    split = discover(data_dir, float(bundle.training.get("val_split", 0.2)), seed)
    if split.class_names != bundle.class_names:
        raise DataError(f"`data_dir` {data_dir} has classes {split.class_names}; the bundle has {bundle.class_names}")
    return pick(split.train, calibration_images, seed), pick(split.val, holdout_images, seed), split.source


def _loader(samples: list[Sample], preprocess: dict, batch_size: int, workers: int):
    dataset = ImageList(samples, eval_transform(preprocess), min_size=preprocess["resize"])
    return make_loader(dataset, batch_size, workers)


def labelled(samples: list[Sample], preprocess: dict, batch_size: int, workers: int) -> list[tuple[torch.Tensor, ...]]:
    """(images, labels) batches, decoded like serving (draft JPEG decoding) and eval-transformed."""
    return list(_loader(samples, preprocess, batch_size, workers))


def batches(samples: list[Sample], preprocess: dict, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """The images of `labelled`, batch by batch, decoded as they are consumed."""
    return (images for images, _ in _loader(samples, preprocess, batch_size, workers))


def compare(reference: Predictor, candidate: Predictor, held_out: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Top-1 agreement, largest probability difference, accuracy and unknown rates of `candidate` against fp32."""
    labels = torch.cat([batch_labels for _, batch_labels in held_out])
    ours, theirs = (concat([p(images) for images, _ in held_out]) for p in (candidate, reference))
    agreement = (ours.probs.argmax(1) == theirs.probs.argmax(1)).float().mean().item()
    report = {
        "agreement": round(agreement, 4),
        "images": len(labels),
        "recommended": agreement >= RECOMMENDED_AGREEMENT,
        "max_probability_difference": float((ours.probs - theirs.probs).abs().max()),
        "accuracy": round((ours.probs.argmax(1) == labels).float().mean().item(), 4),
        "fp32_accuracy": round((theirs.probs.argmax(1) == labels).float().mean().item(), 4),
    }
    if ours.ood_scores is not None:
        report["unknown_rate"] = round((ours.ood_scores > candidate.threshold).float().mean().item(), 4)
        report["fp32_unknown_rate"] = round((theirs.ood_scores > reference.threshold).float().mean().item(), 4)
    return report


def _unmeasured_int8(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PRECISION=int8:")


@contextmanager
def quiet_unmeasured():
    """While a runtime is measured through the loader: the loader's warning that an int8 network has no agreement
    recorded is muted (it is being recorded)."""
    LOADER_LOG.addFilter(_unmeasured_int8)
    try:
        yield
    finally:
        LOADER_LOG.removeFilter(_unmeasured_int8)
