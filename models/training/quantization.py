"""int8 from a data set: training images calibrate, held-out images measure each precision's agreement with fp32,
every predictor measured built by the loader exactly as BACKEND=torch serves it."""

from __future__ import annotations

import os
import time

from models.loader import Loaded, load_predictor
from models.quantize import CPU_PRECISIONS, int8_path, quantize, save_int8
from models.runtime import DeviceError
from models.training.agreement import batches, bundle_split, compare, labelled, measuring
from models.training.data import DataError


def served_agreement(reference: Loaded, held_out: list) -> dict[str, dict]:
    """Each CPU precision's top-1 agreement with `reference` (fp32) on `held_out` (images, labels) batches, as
    BACKEND=torch serves it (int8: the file beside the bundle); a precision the CPU lacks says why it is skipped."""
    report = {}
    for precision in CPU_PRECISIONS:
        try:  # fp32 is the reference itself, built as BACKEND=torch serves fp32
            candidate = (
                reference if precision == "fp32" else load_predictor(reference.ensemble, "cpu", precision, "torch")
            )
        except DeviceError as error:
            report[precision] = {"skipped": str(error)}
            continue
        report[precision] = compare(reference.predictor, candidate.predictor, held_out)
    return report


def quantize_bundle(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    calibration_images: int = 300,
    holdout_images: int = 200,
    batch_size: int = 32,
    workers: int = 2,
) -> dict:
    """Calibrate int8 on training images, write it beside the bundle (where PRECISION=int8 reads it), then record in
    it each precision's agreement with fp32 on held-out images, the int8 one read back through the loader."""
    reference = load_predictor(model_path, "cpu", "fp32", "torch")
    if len(reference.ensemble.bundles) != 1:
        raise ValueError("quantize one bundle at a time (each ensemble member has its own int8 file)")
    bundle = reference.ensemble.bundles[0]
    calibration, holdout, source = bundle_split(bundle, data_dir, calibration_images, holdout_images)
    if not calibration or not holdout:
        raise DataError(f"`data_dir` {data_dir} needs training and held-out images; found {source}")
    started = time.perf_counter()
    images = batches(calibration, bundle.preprocess, batch_size, workers)
    quantized = quantize(bundle.build_model("cpu"), images, bundle.preprocess["crop"])  # unfolded: FX fuses BN
    info = {"calibration": {"images": len(calibration), "data": source,
                            "seconds": round(time.perf_counter() - started, 1)}}  # fmt: skip
    with measuring(int8_path(bundle.path)) as path:
        save_int8(path, quantized, bundle, info)
        held_out = labelled(holdout, bundle.preprocess, batch_size, workers)
        info["agreement"] = served_agreement(reference, held_out)
        save_int8(path, quantized, bundle, info)
    return {"model": str(model_path), "version": bundle.version, "int8": str(path), **info}
