"""int8 from a data set: training images calibrate, held-out images measure each precision's agreement with fp32."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from models.bundle import load_model
from models.quantize import int8_path, precision_agreement, quantize, save_int8
from models.training.data import DataError, ImageList, Sample, discover, make_loader
from models.transforms import eval_transform


def pick(samples: list[Sample], count: int, seed: int) -> list[Sample]:
    """Up to `count` samples, drawn without replacement with a fixed seed (all of them when there are fewer)."""
    if count >= len(samples):
        return list(samples)
    return sorted(random.Random(seed).sample(samples, count))


def batches(samples: list[Sample], preprocess: dict, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """Images decoded like serving (draft JPEG decoding) and eval-transformed, batch by batch."""
    dataset = ImageList(samples, eval_transform(preprocess), min_size=preprocess["resize"])
    return (images for images, _ in make_loader(dataset, batch_size, workers))


def quantize_bundle(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    calibration_images: int = 300,
    holdout_images: int = 200,
    batch_size: int = 32,
    workers: int = 2,
) -> dict:
    """Calibrate int8 on training images, write it next to the bundle, report each precision's agreement."""
    model, bundle = load_model(model_path, "cpu")
    # The split training made (same val_split and seed), so held-out images are ones the weights never saw.
    seed = int(bundle.training.get("seed", 0))
    split = discover(data_dir, float(bundle.training.get("val_split", 0.2)), seed)
    if split.class_names != bundle.class_names:
        raise DataError(f"`data_dir` {data_dir} has classes {split.class_names}; the bundle has {bundle.class_names}")
    calibration = pick(split.train, calibration_images, seed)
    holdout = pick(split.val, holdout_images, seed)
    if not calibration or not holdout:
        raise DataError(f"`data_dir` {data_dir} needs training and held-out images; found {split.source}")
    started = time.perf_counter()
    quantized = quantize(model, batches(calibration, bundle.preprocess, batch_size, workers), bundle.preprocess["crop"])
    seconds = round(time.perf_counter() - started, 1)
    held_out = list(batches(holdout, bundle.preprocess, batch_size, workers))
    agreement = precision_agreement(model, held_out, quantized)
    info = {
        "calibration": {"images": len(calibration), "data": split.source, "seconds": seconds},
        "agreement": agreement,
    }
    path = save_int8(int8_path(model_path) if output is None else Path(output), quantized, bundle, info)
    return {"model": str(model_path), "version": bundle.version, "int8": str(path), **info}
