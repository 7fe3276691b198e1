"""int8 from a data set: training images calibrate, held-out images measure each precision's agreement with fp32,
every predictor measured built by the loader exactly as BACKEND=torch serves it."""

from __future__ import annotations

import dataclasses
import os
import time

from models.bundle import add_runtimes
from models.ensemble import Ensemble
from models.loader import Loaded, load_predictor
from models.quantize import CPU_PRECISIONS, ENTRY, int8_entry, quantize
from models.runtime import DeviceError
from models.training.agreement import batches, bundle_split, compare, labelled, quiet_unmeasured
from models.training.data import DataError


def served_agreement(reference: Loaded, held_out: list) -> dict[str, dict]:
    """Each CPU precision's top-1 agreement with `reference` (fp32) on `held_out` (images, labels) batches, as
    BACKEND=torch serves it (int8: the network the bundle carries); a precision the CPU lacks says why it is skipped."""
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
    """Calibrate int8 on training images, measure each precision's agreement with fp32 on held-out images (int8 as
    the loader serves it from the bundle), and write the int8 network and its measurements into the bundle."""
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
    carrying = dataclasses.replace(bundle, runtimes={**bundle.runtimes, ENTRY: int8_entry(quantized, bundle, info)})
    held_out = labelled(holdout, bundle.preprocess, batch_size, workers)
    with quiet_unmeasured():
        info["agreement"] = served_agreement(dataclasses.replace(reference, ensemble=Ensemble((carrying,))), held_out)
    add_runtimes(bundle.path, bundle.content_hash, {ENTRY: int8_entry(quantized, bundle, info)})
    return {"model": str(model_path), "version": bundle.version, "int8": f"{model_path}:{ENTRY}", **info}
