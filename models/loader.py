"""The one loader: bundle paths, device, precision and backend -> the predictor that runs them.

Serving, evaluation, offline prediction, calibration, quantization, export and the benchmark's raw limit all
build their predictor here, so what is evaluated is what is served. Per member it picks the runtime:
ONNX Runtime on the CPU when the member's graph for the precision exists (backend auto) or is asked for
(onnxruntime), PyTorch otherwise, and always on CUDA. PyTorch float networks get their BatchNorms folded and
run channels-last (measured on ResNet-50: 15-28% less CPU per image, outputs equal to rounding).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from models.ensemble import Ensemble, load_ensemble
from models.graphs import GRAPH_PRECISIONS, GraphError, check_graph, export_command, graph_path
from models.onnx_runtime import OnnxNetwork
from models.predictor import Member, Predictor
from models.quantize import RECOMMENDED_AGREEMENT, int8_path, load_int8
from models.runtime import DeviceError, Runtime, fold_batchnorm, precision_problem, resolve_device

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class Loaded:
    """The served predictor, the PyTorch fp32 one of the same members (/explain, references) and what runs each."""

    predictor: Predictor
    floats: Predictor
    ensemble: Ensemble
    members: tuple[dict, ...]  # per member: backend, precision, graph/file, recorded agreement, why this backend

    @property
    def backends(self) -> tuple[str, ...]:
        """Each member's runtime, 'torch' or 'onnxruntime'."""
        return tuple(member["backend"] for member in self.members)


def backend_of(model) -> str:
    """'onnxruntime' for a graph's session, 'torch' for a PyTorch network."""
    return "onnxruntime" if isinstance(model, OnnxNetwork) else "torch"


def choose_backend(bundle_path: str, device: torch.device, precision: str, backend: str = "auto") -> tuple[str, str]:
    """(runtime, why) for one member: 'onnxruntime' or 'torch'; GraphError when `backend` cannot be honoured."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", "backend torch asked for"
    if device.type != "cpu":
        if backend == "onnxruntime":
            raise GraphError(f"backend onnxruntime serves the CPU only; on {device} use backend auto or torch")
        return "torch", f"PyTorch serves {device.type} devices (ONNX Runtime here serves the CPU)"
    if precision not in GRAPH_PRECISIONS:
        if backend == "onnxruntime":
            served = " and ".join(GRAPH_PRECISIONS)
            raise GraphError(f"ONNX Runtime serves {served}, not {precision}; use backend torch")
        return "torch", f"ONNX Runtime serves {' and '.join(GRAPH_PRECISIONS)}; {precision} runs on PyTorch"
    path = graph_path(bundle_path, precision)
    if path.exists():  # the reason is shown by GET /model: file names, never the server's paths
        return "onnxruntime", f"its {precision} graph {path.name} exists"
    if backend == "onnxruntime":
        command = export_command(bundle_path)
        raise GraphError(f"backend onnxruntime: no {precision} graph at {path}; make it with: {command}")
    command = export_command(os.path.basename(bundle_path))
    return "torch", f"no {precision} graph at {path.name} (make one with: {command})"


def _header(bundle) -> dict:
    """The plain entries check_graph compares a graph with."""
    return {key: getattr(bundle, key) for key in ("content_hash", "class_names", "preprocess", "training")}


def _int8_torch(member: Member, bundle) -> tuple[Member, dict]:
    """The member with its stored FX int8 network (built from its unfolded float one: FX fuses conv, BN and ReLU)."""
    network = load_int8(bundle, member.model)
    network.info["file"] = str(int8_path(bundle.path))
    recorded = (network.info.get("agreement") or {}).get("int8")
    summary = {"file": network.info["file"], "agreement": recorded, "calibration": network.info.get("calibration")}
    return dataclasses.replace(member, model=network), {"file": summary["file"], "agreement": recorded, "int8": summary}


def _warn_agreement(where: str, recorded: dict | None) -> None:
    agreement = (recorded or {}).get("agreement")
    if agreement is None or agreement < RECOMMENDED_AGREEMENT:
        found = "no agreement recorded" if agreement is None else f"top-1 agreement with fp32 {agreement:.2%}"
        log.warning(
            "PRECISION=int8: %s has %s on held-out images (recommended: >= %.0f%%); its answers may differ from "
            "fp32 more than that; measure with scripts/export.py (or scripts/quantize.py for PyTorch's int8)",
            where, found, RECOMMENDED_AGREEMENT * 100,
        )  # fmt: skip


def _member(bundle, runtime: Runtime, precision: str, backend: str, threads: int) -> tuple[Member, Member, dict]:
    """(served member, PyTorch fp32 member, what serves it) for one bundle."""
    chosen, why = choose_backend(bundle.path, runtime.device, precision, backend)
    floats = Member.from_bundle(bundle, runtime)
    if chosen == "onnxruntime":
        path = graph_path(bundle.path, precision)
        info = check_graph(path, _header(bundle), precision, bundle.path)
        network = OnnxNetwork(path, precision, threads, info)
        served, summary = dataclasses.replace(floats, model=network), network.summary()
    elif precision == "int8":
        problem = precision_problem(precision, runtime.device)
        if problem:
            raise DeviceError(f"int8 on PyTorch: {problem}")
        served, summary = _int8_torch(floats, bundle)
        summary = {"backend": "torch", "precision": "int8", **summary}
    else:
        served, summary = floats, {"backend": "torch", "precision": precision, "graph": None, "agreement": None}
    if precision == "int8":
        _warn_agreement(summary.get("graph") or summary.get("file"), summary.get("agreement"))
    fold_batchnorm(floats.model)  # after int8: FX fuses from the unfolded network
    runtime.place(floats.model)  # the folded convolutions channels-last too
    return served, floats, {**summary, "reason": why}


def load_predictor(
    models: Ensemble | str | os.PathLike | Iterable[str],
    device: str | torch.device = "auto",
    precision: str = "fp32",
    backend: str = "auto",
    threads: int = 1,
) -> Loaded:
    """Bundle path(s) ('a.pt,b.pt', a list, or a loaded Ensemble) -> the predictor of `precision` on `device`.

    `threads`: ONNX Runtime's intra-op threads per session (PyTorch's are the caller's torch.set_num_threads).
    Raises BundleError, DeviceError, GraphError or QuantizationError naming the problem and its fix.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    ensemble = models if isinstance(models, Ensemble) else load_ensemble(models)
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if precision in ("bf16", "fp16"):
        problem = precision_problem(precision, device)
        if problem:
            raise DeviceError(f"{precision} on {device}: {problem}")
    amp = precision if precision in ("bf16", "fp16") else "none"
    runtime = Runtime(device, amp=amp, channels_last=True)
    built = [_member(bundle, runtime, precision, backend, threads) for bundle in ensemble.bundles]
    served = [one[0] for one in built]
    floats = [one[1] for one in built]
    # A batch for ONNX Runtime alone is stacked contiguous NCHW, the layout its graphs take.
    runtime = dataclasses.replace(runtime, channels_last=any(not isinstance(m.model, OnnxNetwork) for m in served))
    predictor = Predictor(served, runtime)
    reference = predictor if precision == "fp32" and all(m is f for m, f in zip(served, floats)) else None
    float_runtime = Runtime(device, channels_last=True)
    return Loaded(predictor, reference or Predictor(floats, float_runtime), ensemble, tuple(one[2] for one in built))
