"""int8 for x86 CPUs: post-training static quantization of a bundle's network, stored next to the bundle.

PyTorch's own FX graph-mode flow with the x86 backend (fbgemm/oneDNN kernels, per-channel int8 weights, uint8
activations observed by histogram). torch 2.11 to 2.14 ship it as torch.ao.quantization, marked deprecated in
favour of torchao's PT2E flow, whose speed needs torch.compile (minutes of start-up per worker on two cores); the
FX model runs eagerly. The backbone is quantized; the small head stays float32, so the network keeps the
PetClassifier split (backbone -> penultimate features -> head) that feature-based OOD scores read. The bundle
carries it as its `torch/int8` runtimes entry, plain (torch.load(weights_only=True)): the quantized state dict, tied
to the bundle's content hash (bundles of format 1/2 had it beside them, `<stem>.int8.pt`, which they still read). A
worker rebuilds the graph from the bundle's fp32 network (prepare + convert, no calibration) and loads the stored
int8 weights and scales into it, so it never recalibrates.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from models.bundle import Bundle
from models.graphs import bundle_header, carries_inside

INT8_FORMAT = {"name": "pet-classifier-int8", "version": 2}  # 2: int8 backbone, float head
ENTRY = "torch/int8"  # its name in the bundle's runtimes
BACKEND = "x86"
RECOMMENDED_AGREEMENT = 0.99  # a precision whose top-1 agrees with fp32 on fewer held-out images is not recommended
CPU_PRECISIONS = ("fp32", "bf16", "int8")  # what scripts/quantize.py measures on the CPU


class QuantizationError(ValueError):
    """int8 is unavailable, or an int8 file is missing, stale or unreadable; the message says what to do."""


def int8_path(bundle_path: str | os.PathLike) -> Path:
    """Where format-1/2 bundles had their int8 network: models/pet_classifier.pt -> models/pet_classifier.int8.pt."""
    path = Path(bundle_path)
    return path.with_name(f"{path.stem}.int8{path.suffix or '.pt'}")


# torch.ao.quantization warns on every call: its own deprecation, reduce_range, empty observers when a worker
# rebuilds the graph (the stored scales replace their defaults), quantized dtypes, TypedStorage in torch.load.
_NOISE = (
    "torch.ao.quantization is deprecated",
    "Please use quant_min and quant_max",
    "must run observer before calling calculate_qparams",
    "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation",
    "TypedStorage is deprecated",
)


@contextmanager
def _quiet():
    """Silence the known warnings above, and only them."""
    with warnings.catch_warnings():
        for message in _NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


class Int8Network(nn.Module):
    """A PetClassifier with an int8 backbone (FX graph) and its float head; `info` is what its file records."""

    def __init__(self, backbone: nn.Module, head: nn.Module, info: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.info = dict(info or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _prepare(model: nn.Module, crop: int) -> nn.Module:
    """A copy of `model` with observers inserted (FX graph mode, x86 qconfig)."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx
    except ImportError as error:
        raise QuantizationError(
            f"torch {torch.__version__} no longer ships torch.ao.quantization's FX flow; serve fp32 or bf16"
        ) from error
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise QuantizationError(f"this torch build has no {BACKEND} quantized engine; serve fp32")
    torch.backends.quantized.engine = BACKEND
    example = (torch.zeros(1, 3, crop, crop),)
    with _quiet():
        return prepare_fx(copy.deepcopy(model).cpu().eval(), get_default_qconfig_mapping(BACKEND), example)


def _convert(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(prepared).eval()


def _head(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model.head).cpu().eval().requires_grad_(False)


def quantize(model: nn.Module, calibration: Iterable[torch.Tensor], crop: int) -> Int8Network:
    """PetClassifier + calibration batches (B, 3, crop, crop), eval-transformed -> its int8 network on the CPU."""
    prepared = _prepare(model.backbone, crop)
    seen = 0
    with torch.inference_mode():
        for batch in calibration:
            prepared(batch.cpu())
            seen += len(batch)
    if not seen:
        raise QuantizationError("no calibration images: static quantization needs a few hundred training images")
    return Int8Network(_convert(prepared), _head(model))


def int8_entry(quantized: nn.Module, bundle: Bundle, info: dict | None = None) -> dict:
    """The `torch/int8` runtimes entry of `bundle` for `quantized`, its int8 network."""
    return {
        "format": dict(INT8_FORMAT),
        "bundle_hash": bundle.content_hash,
        "backend": BACKEND,
        "torch": torch.__version__.split("+")[0],
        "state_dict": quantized.state_dict(),
        "info": info or {},
    }


def quantize_command(bundle_path: str | os.PathLike, data_dir: str | None = None) -> str:
    """The command that writes the int8 network into the bundle at `bundle_path`."""
    return f"python scripts/quantize.py --model {bundle_path} --data-dir {data_dir or 'DIR (its training data)'}"


def _load(path: Path) -> dict:
    try:
        with _quiet():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for non-torch or unsafe files
        raise QuantizationError(f"{path} is not an int8 network file: {error}") from error


def _entry_problem(state, where: str, content_hash: str | None) -> str | None:
    """Why a stored int8 network (an entry, or a format-1/2 file) is unusable for the bundle, else None."""
    if not isinstance(state, dict) or state.get("format") != INT8_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        return f"{where} is not an int8 network of this version: format {found!r}, expected {INT8_FORMAT}"
    if state.get("bundle_hash") != content_hash:
        return f"{where} was made from another bundle than sha256:{str(content_hash)[:12]}"
    return None


def _stored(bundle_path: str | os.PathLike, header: dict) -> tuple[dict | None, str]:
    """(the stored int8 network, where it is): the bundle's entry, or for format 1/2 the file beside it; `header`:
    the bundle's format and runtimes (bundle_header, or Bundle.carried_header)."""
    if carries_inside(header):
        return (header.get("runtimes") or {}).get(ENTRY), f"{os.path.basename(bundle_path)}:{ENTRY}"
    path = int8_path(bundle_path)
    return (_load(path) if path.is_file() else None), str(path)


def read_int8(bundle: Bundle) -> dict:
    """The bundle's int8 network, checked (format, made from this very bundle); raises QuantizationError."""
    command = quantize_command(bundle.path, bundle.training.get("data_dir"))
    state, where = _stored(bundle.path, bundle.carried_header)
    if state is None:
        raise QuantizationError(f"{os.path.basename(bundle.path)} carries no int8 network; make it with: {command}")
    problem = _entry_problem(state, where, bundle.content_hash)
    if problem:
        raise QuantizationError(f"{problem}; make it again with: {command}")
    return {**state, "where": where}


def int8_problem(bundle_path: str | os.PathLike) -> str | None:
    """Why the bundle at `bundle_path` cannot be served in int8 by PyTorch (no int8 network, or an unusable one,
    with the command that fixes it), else None. Cheap: read without tensors."""
    try:
        header = bundle_header(bundle_path)
        content_hash = header.get("content_hash")
    except Exception:  # an unreadable bundle is reported by the bundle loader itself
        return None
    command = quantize_command(bundle_path, (header.get("training") or {}).get("data_dir"))
    try:
        state, where = _stored(bundle_path, header)
    except QuantizationError as error:
        return f"{error}; make it again with: {command}"
    if state is None:
        return f"{bundle_path} carries no int8 network; make it with: {command}"
    problem = _entry_problem(state, where, content_hash)
    return f"{problem}; make it again with: {command}" if problem else None


def load_int8(bundle: Bundle, model: nn.Module | None = None) -> Int8Network:
    """The bundle's stored int8 network (no recalibration); `model`: its fp32 network, if built."""
    state = read_int8(bundle)
    model = bundle.build_model("cpu") if model is None else model
    quantized = Int8Network(_convert(_prepare(model.backbone, bundle.preprocess["crop"])), _head(model), state["info"])
    try:
        with _quiet():
            quantized.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise QuantizationError(
            f"{state['where']} does not fit the int8 graph that torch {torch.__version__.split('+')[0]} builds "
            f"(it was made with torch {state.get('torch')}); run scripts/quantize.py again: {error}"
        ) from error
    return quantized
