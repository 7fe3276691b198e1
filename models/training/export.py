"""ONNX graphs of a bundle for ONNX Runtime on the CPU: fp32 by torch.onnx's exporter, int8 by ONNX Runtime's
static quantization (QDQ, per-channel int8 weights, uint8 activations, min-max calibration on training images
through the bundle's eval transform), each measured against PyTorch fp32 on held-out images before it is written.

The bundle carries them (its `runtimes`, models/graphs.py says what they hold): the file is rewritten once,
atomically, with every graph made and measured, each tied to the bundle's content hash and carrying the
measurements in its metadata, which GET /model shows and start-up checks.
"""

from __future__ import annotations

import dataclasses
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

from models.bundle import add_runtimes, load_bundle
from models.ensemble import Ensemble
from models.graphs import (
    GRAPH_FORMAT,
    GRAPH_PRECISIONS,
    INPUT,
    META_FORMAT,
    META_HASH,
    META_INFO,
    META_PRECISION,
    OUTPUTS,
    GraphError,
    bundle_header,
    carried,
    carries_inside,
    check_graph,
    entry_name,
    graph_entry,
    graph_path,
)
from models.loader import load_predictor
from models.predictor import Predictor
from models.quantize import ENTRY, QuantizationError, int8_path, read_int8
from models.training.agreement import batches, bundle_split, compare, labelled, quiet_unmeasured
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


def _entry(untagged: Path, bundle, precision: str, info: dict) -> dict:
    """The bundle's runtimes entry for the graph at `untagged`, tagged with the bundle's hash and `info`."""
    import onnx

    graph = onnx.load(str(untagged))
    _tag(graph, bundle, precision, info)
    data = graph.SerializeToString()
    graph_bytes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return {**graph_entry(data, info), "bundle_hash": bundle.content_hash, "graph": graph_bytes}


def _measured(reference: Predictor, bundle, precision: str, entry: dict, held_out) -> dict:
    """The graph `entry`, loaded as BACKEND=onnxruntime serves it from the bundle, compared with `reference`."""
    carrying = dataclasses.replace(bundle, runtimes={**bundle.runtimes, entry_name(precision): entry})
    with quiet_unmeasured():
        candidate = load_predictor(Ensemble((carrying,)), "cpu", precision, "onnxruntime", torch.get_num_threads())
    return compare(reference, candidate.predictor, held_out)


def export_bundle(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    precisions: tuple[str, ...] = GRAPH_PRECISIONS,
    calibration_images: int = 300,
    holdout_images: int = 200,
    batch_size: int = 32,
    workers: int = 2,
) -> dict:
    """Write the bundle's graphs into it; with `data_dir` (its training data, split as its training split it) each
    is measured on held-out images against PyTorch fp32, and int8 is calibrated on training images (int8 needs
    `data_dir`)."""
    split = None
    if data_dir is not None:
        split = bundle_split(load_bundle(model_path), data_dir, calibration_images, holdout_images)
    return export_split(model_path, split, precisions, batch_size, workers)


def export_split(model_path: str | os.PathLike, split: tuple[list, list, str] | None, precisions: tuple[str, ...],
                 batch_size: int = 32, workers: int = 2) -> dict:  # fmt: skip
    """Write the bundle's graphs into it, int8 calibrated on `split`'s (calibration samples, held-out samples,
    source) first part and each measured on its second; without a split, fp32 only, unmeasured."""
    loaded = load_predictor(model_path, "cpu", "fp32", "torch")
    bundle, reference = loaded.ensemble.bundles[0], loaded.floats
    if len(loaded.ensemble.bundles) != 1:
        raise ValueError("export one bundle at a time (each ensemble member carries its own graphs)")
    if split is None and "int8" in precisions:
        raise DataError("int8 is calibrated on the bundle's training images: give `data_dir`")
    calibration, holdout, source = split or ([], [], None)
    held_out = labelled(holdout, bundle.preprocess, batch_size, workers) if holdout else []
    calibration_batches = batches(calibration, bundle.preprocess, batch_size, workers)
    entries = make_graphs(bundle, reference, precisions, calibration_batches, held_out, source)
    add_runtimes(bundle.path, bundle.content_hash, entries)
    graphs = {name: {"bytes": entry["bytes"], **entry["info"]} for name, entry in entries.items()}
    return {"model": str(model_path), "version": bundle.version, "runtimes": graphs}


def make_graphs(bundle, reference: Predictor, precisions, calibration=(), held_out=(), source=None) -> dict:
    """The bundle's runtimes entries for its graphs: int8 calibrated on the `calibration` batches, each measured
    against `reference` (its PyTorch fp32 predictor) on `held_out` (images, labels) batches when given, loaded
    from the bundle as BACKEND=onnxruntime loads it."""
    entries = {}
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_fp32(bundle.build_model("cpu"), bundle.preprocess["crop"], Path(folder) / "fp32.onnx")
        for precision in precisions:
            started = time.perf_counter()
            untagged, info = fp32, {"torch": torch.__version__.split("+")[0], "opset": OPSET}
            if precision == "int8":
                untagged = Path(folder) / "int8.onnx"
                seen = quantize_int8(fp32, calibration, untagged)
                info["calibration"] = {"images": seen, "data": source, "method": "static QDQ, per-channel, min-max"}
            if held_out:  # tagged but unmeasured first: measured as the loader serves it
                unmeasured = _entry(untagged, bundle, precision, info)
                info["agreement"] = {precision: _measured(reference, bundle, precision, unmeasured, held_out)}
            info["seconds"] = round(time.perf_counter() - started, 1)
            entries[entry_name(precision)] = _entry(untagged, bundle, precision, info)
    return entries


def upgrade_bundle(model_path: str | os.PathLike) -> dict:
    """A format-1/2 bundle with its graphs and PyTorch int8 network beside it -> one format-3 file carrying those
    made from it (rewritten atomically); the files moved in are removed, others (made from another bundle) named."""
    bundle = load_bundle(model_path)
    if carries_inside(bundle.carried_header):
        carries = sorted(bundle.runtimes)
        return {"model": str(model_path), "version": bundle.version, "upgraded": False, "carries": carries}
    header, entries, moved, left = bundle_header(model_path), {}, [], []
    for precision in GRAPH_PRECISIONS:
        graph = carried(model_path, header, precision)
        if graph is None:
            continue
        try:
            info = check_graph(graph, header, precision, model_path)
        except GraphError as error:
            left.append(f"{graph.where}: {error}")
            continue
        graph_bytes = torch.frombuffer(bytearray(graph.data), dtype=torch.uint8)
        entries[entry_name(precision)] = {**graph_entry(graph.data, info), "graph": graph_bytes}
        moved.append(graph_path(model_path, precision))
    if int8_path(model_path).is_file():
        try:
            state = read_int8(bundle)
            entries[ENTRY] = {key: value for key, value in state.items() if key != "where"}
            moved.append(int8_path(model_path))
        except QuantizationError as error:
            left.append(f"{int8_path(model_path)}: {error}")
    add_runtimes(model_path, bundle.content_hash, entries)
    for path in moved:
        path.unlink()
    return {"model": str(model_path), "version": bundle.version, "upgraded": True, "carries": sorted(entries),
            "moved_in": [str(p) for p in moved], "left_beside": left}  # fmt: skip
