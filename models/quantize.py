"""int8 for x86 CPUs: post-training static quantization of a bundle's network, stored next to the bundle.

PyTorch's own FX graph-mode flow with the x86 backend (fbgemm/oneDNN kernels, per-channel int8 weights, uint8
activations observed by histogram). torch 2.11 to 2.14 ship it as torch.ao.quantization, marked deprecated in
favour of torchao's PT2E flow, whose speed needs torch.compile (minutes of start-up per worker on two cores); the
FX model runs eagerly. The backbone is quantized; the small head stays float32, so the network keeps the
PetClassifier split (backbone -> penultimate features -> head) that feature-based OOD scores read. The int8 file
is a plain dict (torch.load(weights_only=True)): the quantized state dict plus the bundle's content hash. A worker
rebuilds the graph from the bundle's fp32 network (prepare + convert, no calibration) and loads the stored int8
weights and scales into it, so it never recalibrates.
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

from models.bundle import Bundle, atomic_save

INT8_FORMAT = {"name": "pet-classifier-int8", "version": 2}  # 2: int8 backbone, float head
BACKEND = "x86"
RECOMMENDED_AGREEMENT = 0.99  # a precision whose top-1 agrees with fp32 on fewer held-out images is not recommended
CPU_PRECISIONS = ("fp32", "bf16", "int8")  # what scripts/quantize.py measures on the CPU


class QuantizationError(ValueError):
    """int8 is unavailable, or an int8 file is missing, stale or unreadable; the message says what to do."""


def int8_path(bundle_path: str | os.PathLike) -> Path:
    """Where the int8 network of a bundle lives: models/pet_classifier.pt -> models/pet_classifier.int8.pt."""
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


def save_int8(path: str | os.PathLike, quantized: nn.Module, bundle: Bundle, info: dict | None = None) -> Path:
    """Write the int8 network for `bundle` (its content hash included) atomically; returns the path."""
    state = {
        "format": dict(INT8_FORMAT),
        "bundle_hash": bundle.content_hash,
        "backend": BACKEND,
        "torch": torch.__version__.split("+")[0],
        "state_dict": quantized.state_dict(),
        "info": info or {},
    }
    atomic_save(state, path)
    return Path(path)


def quantize_command(bundle_path: str | os.PathLike, data_dir: str | None = None) -> str:
    """The command that writes the int8 network of the bundle at `bundle_path`."""
    return f"python scripts/quantize.py --model {bundle_path} --data-dir {data_dir or 'DIR (its training data)'}"


def _load(path: Path, mmap: bool = False) -> dict:
    try:
        with _quiet():
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for non-torch or unsafe files
        raise QuantizationError(f"{path} is not an int8 network file: {error}") from error
    if not isinstance(state, dict) or state.get("format") != INT8_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise QuantizationError(f"{path} is not an int8 network file of this version: format {found!r}, expected "
                                f"{INT8_FORMAT}")  # fmt: skip
    return state


def _stale(path: Path, bundle_path: str | os.PathLike, version: str) -> str:
    return f"{path} was made from another bundle than {bundle_path} (version {version})"


def read_int8(path: str | os.PathLike, bundle: Bundle) -> dict:
    """The int8 file for `bundle`, checked (format, and made from this very bundle); raises QuantizationError."""
    path = Path(path)
    command = quantize_command(bundle.path, bundle.training.get("data_dir"))
    if not path.is_file():
        raise QuantizationError(f"no int8 network at {path}; make it with: {command}")
    try:
        state = _load(path)
    except QuantizationError as error:
        raise QuantizationError(f"{error}; make it again with: {command}") from error
    if state.get("bundle_hash") != bundle.content_hash:
        raise QuantizationError(f"{_stale(path, bundle.path, bundle.version)}; make it again with: {command}")
    return state


def int8_problem(bundle_path: str | os.PathLike) -> str | None:
    """Why the bundle at `bundle_path` cannot be served in int8 (its int8 file missing, unreadable or made from
    another bundle, with the command that fixes it), else None. Cheap: both files are memory-mapped, not read."""
    path = int8_path(bundle_path)
    try:
        bundle = torch.load(bundle_path, map_location="cpu", weights_only=True, mmap=True)
        training, content_hash = bundle.get("training") or {}, bundle.get("content_hash")
    except Exception:  # an unreadable bundle is reported by the bundle loader itself
        return None
    command = quantize_command(bundle_path, training.get("data_dir"))
    if not path.is_file():
        return f"no int8 network at {path}; make it with: {command}"
    try:
        state = _load(path, mmap=True)
    except QuantizationError as error:
        return f"{error}; make it again with: {command}"
    if state.get("bundle_hash") != content_hash:
        return f"{_stale(path, bundle_path, 'sha256:' + str(content_hash)[:12])}; make it again with: {command}"
    return None


def load_int8(bundle: Bundle, model: nn.Module | None = None, path: str | os.PathLike | None = None) -> Int8Network:
    """The bundle's int8 network from its stored file (no recalibration); `model`: its fp32 network, if built."""
    path = int8_path(bundle.path) if path is None else path
    state = read_int8(path, bundle)
    model = bundle.build_model("cpu") if model is None else model
    quantized = Int8Network(_convert(_prepare(model.backbone, bundle.preprocess["crop"])), _head(model), state["info"])
    try:
        with _quiet():
            quantized.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise QuantizationError(
            f"{path} does not fit the int8 graph that torch {torch.__version__.split('+')[0]} builds "
            f"(it was made with torch {state.get('torch')}); run scripts/quantize.py again: {error}"
        ) from error
    return quantized
