"""The one loader: bundle paths, device, precision and backend -> the predictor that runs them.

Serving, evaluation, offline prediction, calibration, quantization, export and the benchmark's raw limit all
build their predictor here, so what is evaluated is what is served. Per member it picks the runtime: under backend
auto on the CPU, the faster of ONNX Runtime and PyTorch, timed on this machine (models/choice.py), where both can
serve the precision (the bundle carries the member's graph; for int8 its PyTorch int8 network too), else the one
that can; ONNX Runtime when asked for (onnxruntime); PyTorch otherwise, and always on CUDA. PyTorch float networks
get their BatchNorms folded and run channels-last (measured on ResNet-50: 15-28% less CPU per image, outputs equal
to rounding).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from models.choice import TRIAL_BATCH, faster, trial_images
from models.ensemble import Ensemble, load_ensemble
from models.graphs import (
    GRAPH_PRECISIONS,
    GraphError,
    carried,
    carries,
    check_graph,
    entry_name,
    export_command,
    missing_graph,
)
from models.onnx_runtime import OnnxNetwork
from models.predictor import Member, Predictor
from models.quantize import RECOMMENDED_AGREEMENT, QuantizationError, load_int8, read_int8
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


def _graph(bundle, precision: str):
    """The graph the loaded bundle carries for `precision` (format 1/2: the file beside it), or None."""
    return carried(bundle.path, bundle.carried_header, precision, read=lambda entry: entry["graph"].numpy().tobytes())


def choose_backend(bundle, device: torch.device, precision: str, backend: str = "auto") -> tuple[str, str]:
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
    name = os.path.basename(bundle.path)
    # The reason is shown by GET /model: file names, never the server's paths.
    if carries(bundle.path, precision, bundle.carried_header):
        return "onnxruntime", f"{name} carries its {precision} graph"
    if backend == "onnxruntime":
        raise GraphError(missing_graph(bundle.path, precision))
    return "torch", f"{name} carries no {precision} graph (make one with: {export_command(name)})"


def _header(bundle) -> dict:
    """The plain entries check_graph compares a graph with."""
    return {key: getattr(bundle, key) for key in ("content_hash", "class_names", "preprocess", "training")}


def _int8_torch(member: Member, bundle) -> tuple[Member, dict]:
    """The member with its stored FX int8 network (built from its unfolded float one: FX fuses conv, BN and ReLU)."""
    network = load_int8(bundle, member.model)
    network.info["file"] = network.info.get("where") or f"{os.path.basename(bundle.path)}:torch/int8"
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


def _int8_problem(bundle) -> str | None:
    """Why PyTorch cannot serve the loaded bundle in int8 (no usable int8 network), else None."""
    try:
        read_int8(bundle)
    except QuantizationError as error:
        return str(error)
    return None


def _candidates(bundle, device: torch.device, precision: str, backend: str) -> tuple[tuple[str, ...], str]:
    """The runtimes that can serve one member (ONNX Runtime first), and why: both under auto on the CPU when the
    graph for `precision` exists and PyTorch serves it too (fp32 always; int8 with a current int8 file)."""
    chosen, why = choose_backend(bundle, device, precision, backend)
    if backend != "auto" or chosen != "onnxruntime":
        return (chosen,), why
    problem = precision_problem(precision, device) or (_int8_problem(bundle) if precision == "int8" else None)
    if problem:
        return (chosen,), f"{why}; PyTorch's {precision} is no candidate: {problem}"
    return ("onnxruntime", "torch"), why


def _build(name: str, floats: Member, bundle, runtime: Runtime, precision: str, threads: int) -> tuple[Member, dict]:
    """The member as runtime `name` serves it, and what GET /model says of it."""
    if name == "onnxruntime":
        graph = _graph(bundle, precision)
        info = check_graph(graph, _header(bundle), precision, bundle.path)
        network = OnnxNetwork(graph, precision, threads, info)
        return dataclasses.replace(floats, model=network), network.summary()
    if precision == "int8":
        problem = precision_problem(precision, runtime.device)
        if problem:
            raise DeviceError(f"int8 on PyTorch: {problem}")
        served, summary = _int8_torch(floats, bundle)
        return served, {"backend": "torch", "precision": "int8", **summary}
    return floats, {"backend": "torch", "precision": precision, "graph": None, "agreement": None}


def _measure(built: dict, bundle, runtime: Runtime, precision: str, threads: int, batch: int) -> tuple[str, dict]:
    """Time the built candidates (models.choice): (the faster one's reason, the figures GET /model shows)."""
    predictors = {
        name: Predictor([member], dataclasses.replace(runtime, channels_last=name == "torch"))  # ORT: NCHW
        for name, (member, _) in built.items()
    }
    measured = faster(predictors, trial_images(batch, bundle.preprocess["crop"]), threads)
    name = os.path.basename(bundle.path)
    files = {"onnxruntime": f"{name}:{entry_name(precision)}", "torch": f"{name}:torch/int8" if precision == "int8"
             else name}  # fmt: skip
    figures = {name: {"file": files[name], "ms_per_image": ms} for name, ms in measured.ms_per_image.items()}
    record = {
        "backend": measured.backend,
        "batch": measured.batch,
        "threads": threads,
        "candidates": figures,
        "seconds": measured.seconds,
    }
    return measured.reason(precision), record


def _decided(
    names: tuple[str, ...], why: str, bundle, chosen: Mapping | None
) -> tuple[tuple[str, ...], str, dict | None]:
    """Where `chosen` (content hash -> a measurement made elsewhere) is given, its choice for this member."""
    if len(names) < 2 or chosen is None:
        return names, why, None
    entry = chosen.get(bundle.content_hash)
    if not entry:
        return names[:1], f"{why} (not measured against PyTorch: no start-up measurement of {bundle.version})", None
    return (entry["backend"],), entry["reason"], entry.get("measured")


def _member(bundle, runtime: Runtime, precision: str, backend: str, threads: int, chosen: Mapping | None,
            trial_batch: int) -> tuple[Member, Member, dict]:  # fmt: skip
    """(served member, PyTorch fp32 member, what serves it and why) for one bundle."""
    names, why, measured = _decided(*_candidates(bundle, runtime.device, precision, backend), bundle, chosen)
    floats = Member.from_bundle(bundle, runtime)
    built = {}
    for name in names:  # PyTorch's int8 before the fold: FX fuses conv, BN and ReLU from the unfolded network
        try:
            built[name] = _build(name, floats, bundle, runtime, precision, threads)
        except QuantizationError as error:
            if len(names) == 1:
                raise
            why = f"{why}; PyTorch's int8 is no candidate: {error}"
    fold_batchnorm(floats.model)
    runtime.place(floats.model)  # the folded convolutions channels-last too
    if len(built) > 1:
        why, measured = _measure(built, bundle, runtime, precision, threads, trial_batch)
    served, summary = built[measured["backend"] if measured else next(iter(built))]
    if precision == "int8":
        _warn_agreement(summary.get("graph") or summary.get("file"), summary.get("agreement"))
    return served, floats, {**summary, "reason": why, "measured": measured}


def load_predictor(
    models: Ensemble | str | os.PathLike | Iterable[str],
    device: str | torch.device = "auto",
    precision: str = "fp32",
    backend: str = "auto",
    threads: int = 1,
    chosen: Mapping[str, Mapping] | None = None,
    trial_batch: int = TRIAL_BATCH,
) -> Loaded:
    """Bundle path(s) ('a.pt,b.pt', a list, or a loaded Ensemble) -> the predictor of `precision` on `device`.

    `threads`: ONNX Runtime's intra-op threads per session (PyTorch's are the caller's torch.set_num_threads).
    Where both runtimes can serve a member (backend auto on the CPU), both are timed on `trial_batch` images and the
    faster serves; `chosen` (content hash -> {backend, reason, measured}, a measurement made before, e.g. by
    gunicorn's master) skips that: a member it lacks is served by ONNX Runtime, unmeasured.
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
    built = [_member(b, runtime, precision, backend, threads, chosen, trial_batch) for b in ensemble.bundles]
    served = [one[0] for one in built]
    floats = [one[1] for one in built]
    # A batch for ONNX Runtime alone is stacked contiguous NCHW, the layout its graphs take.
    runtime = dataclasses.replace(runtime, channels_last=any(not isinstance(m.model, OnnxNetwork) for m in served))
    predictor = Predictor(served, runtime)
    reference = predictor if precision == "fp32" and all(m is f for m, f in zip(served, floats)) else None
    float_runtime = Runtime(device, channels_last=True)
    return Loaded(predictor, reference or Predictor(floats, float_runtime), ensemble, tuple(one[2] for one in built))
