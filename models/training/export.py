"""ONNX graphs of a bundle for ONNX Runtime on the CPU: fp32 by torch.onnx's exporter, int8 by ONNX Runtime's
static quantization (QDQ, per-channel int8 weights, uint8 activations, min-max calibration on training images
through the bundle's eval transform), each measured against PyTorch fp32 on held-out images before it is written.

The graphs are written beside the bundle (models/graphs.py says where and what they hold) and carry the bundle's
content hash and the measurements in their metadata, which GET /model shows and start-up checks.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.ensemble import Ensemble
from models.graphs import GRAPH_FORMAT, INPUT, META_FORMAT, META_HASH, META_INFO, META_PRECISION, OUTPUTS, graph_path
from models.loader import load_predictor
from models.predictor import Predictor
from models.training.agreement import batches, bundle_split, compare, labelled, measuring
from models.training.data import DataError

OPSET = 18


class _LogitsAndFeatures(nn.Module):
    """PetClassifier -> (logits, penultimate features): what the graph returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.backbone(images)
        return self.model.head(features), features


def _tag(model, bundle, precision: str, info: dict) -> None:
    """Write the metadata that ties the graph to its bundle (and what export measured) into the ONNX model."""
    entries = {META_FORMAT: GRAPH_FORMAT, META_HASH: bundle.content_hash, META_PRECISION: precision,
               META_INFO: json.dumps(info)}  # fmt: skip
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def _save(model, path: Path) -> Path:
    """onnx.save to a temporary file beside `path`, then rename (a reader never sees half a graph)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(handle)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def export_fp32(model: nn.Module, crop: int, path: str | os.PathLike) -> Path:
    """A PetClassifier -> its untagged fp32 ONNX graph at `path` (dynamic batch axis), by the dynamo exporter."""
    wrapper = _LogitsAndFeatures(model.cpu().eval()).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            wrapper, (torch.zeros(2, 3, crop, crop),), None, dynamo=True, input_names=[INPUT],
            output_names=list(OUTPUTS), dynamic_shapes=({0: batch},), opset_version=OPSET, verbose=False,
        )  # fmt: skip
    program.save(str(path))
    return Path(path)


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over eval-transformed batches."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self._batches = iter(batches)
        self.images = 0

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {INPUT: np.ascontiguousarray(batch.numpy())}

    def rewind(self) -> None:  # the reader is read once
        pass


def quantize_int8(fp32_path: str | os.PathLike, calibration: Iterable[torch.Tensor], path: str | os.PathLike) -> int:
    """The fp32 graph -> its untagged int8 graph (static QDQ, per-channel weights) at `path`; returns images seen."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference, BatchNorm folded: what ORT quantizes
        reader = _Reader(calibration)
        quantize_static(
            str(prepared), str(path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    if not reader.images:
        raise DataError("no calibration images: static quantization needs a few hundred training images")
    return reader.images


def _measured(reference: Predictor, bundle, precision: str, held_out) -> dict:
    """The graph beside the bundle, loaded as BACKEND=onnxruntime serves it, compared with `reference` (fp32)."""
    candidate = load_predictor(Ensemble((bundle,)), "cpu", precision, "onnxruntime", torch.get_num_threads())
    return compare(reference, candidate.predictor, held_out)


def _finish(untagged: Path, bundle, precision: str, info: dict, output: Path) -> Path:
    import onnx

    graph = onnx.load(str(untagged))
    _tag(graph, bundle, precision, info)
    return _save(graph, output)


def export_bundle(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    calibration_images: int = 300,
    holdout_images: int = 200,
    batch_size: int = 32,
    workers: int = 2,
) -> dict:
    """Write the bundle's graphs beside it; with `data_dir` (its training data) each is measured on held-out
    images against PyTorch fp32, and int8 is calibrated on training images (int8 needs `data_dir`)."""
    loaded = load_predictor(model_path, "cpu", "fp32", "torch")
    bundle, reference = loaded.ensemble.bundles[0], loaded.floats
    if len(loaded.ensemble.bundles) != 1:
        raise ValueError("export one bundle at a time (each ensemble member has its own graphs)")
    calibration, held_out, source = [], [], None
    if data_dir is not None:
        calibration, holdout, source = bundle_split(bundle, data_dir, calibration_images, holdout_images)
        held_out = labelled(holdout, bundle.preprocess, batch_size, workers)
    elif "int8" in precisions:
        raise DataError("int8 is calibrated on the bundle's training images: give `data_dir`")
    calibration_batches = batches(calibration, bundle.preprocess, batch_size, workers)
    graphs = write_graphs(bundle, reference, precisions, calibration_batches, held_out, source)
    return {"model": str(model_path), "version": bundle.version, "graphs": graphs}


def write_graphs(bundle, reference: Predictor, precisions, calibration=(), held_out=(), source=None) -> dict:
    """Export the bundle's graphs beside it: int8 calibrated on the `calibration` batches, each measured against
    `reference` (its PyTorch fp32 predictor) on `held_out` (images, labels) batches when given, loaded back from
    where it is served as BACKEND=onnxruntime loads it; returns their info."""
    graphs = {}
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_fp32(bundle.build_model("cpu"), bundle.preprocess["crop"], Path(folder) / "fp32.onnx")
        for precision in precisions:
            started = time.perf_counter()
            untagged, info = fp32, {"torch": torch.__version__.split("+")[0], "opset": OPSET}
            if precision == "int8":
                untagged = Path(folder) / "int8.onnx"
                seen = quantize_int8(fp32, calibration, untagged)
                info["calibration"] = {"images": seen, "data": source, "method": "static QDQ, per-channel, min-max"}
            with measuring(graph_path(bundle.path, precision)) as path:
                if held_out:  # tagged but unmeasured first: the loader reads the graph where it will be served
                    _finish(untagged, bundle, precision, info, path)
                    info["agreement"] = {precision: _measured(reference, bundle, precision, held_out)}
                info["seconds"] = round(time.perf_counter() - started, 1)
                _finish(untagged, bundle, precision, info, path)
            graphs[precision] = {"path": str(path), **info}
    return graphs
