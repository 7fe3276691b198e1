"""The model bundle: one self-describing file written by training and read by serving."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.ood import OodDetector, OodError
from models.pet_classifier import HeadConfig, PetClassifier
from models.transforms import validate_preprocess

FORMAT_NAME = "pet-classifier-bundle"
# 2 added `calibration` and `ood`; 3 the `runtimes` the bundle is served with. Older bundles are upgraded on load.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
REQUIRED_KEYS = ("format", "arch", "head", "class_names", "preprocess", "state_dict", "content_hash")
UNCALIBRATED = {"temperature": 1.0}  # what a bundle without a fitted temperature means
# What a bundle may carry besides its weights, each made from them: ONNX Runtime's graphs and PyTorch's int8 network.
RUNTIME_ENTRIES = ("onnxruntime/fp32", "onnxruntime/int8", "torch/int8")


class BundleError(ValueError):
    """A file is not a usable model bundle; the message names the file and the problem."""


@dataclass
class Bundle:
    """A loaded bundle: everything needed to rebuild the model and its eval transform."""

    path: str
    arch: str
    head: dict
    class_names: list[str]
    preprocess: dict
    state_dict: dict
    content_hash: str
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=lambda: dict(UNCALIBRATED))
    ood: dict | None = None  # None: no detector, so nothing is flagged unknown
    runtimes: dict = field(default_factory=dict)  # RUNTIME_ENTRIES it carries, each tied to content_hash
    format_version: int = FORMAT_VERSION

    @property
    def carried_header(self) -> dict:
        """Its format and runtimes as models.graphs.bundle_header reads them from the file (what it carries)."""
        return {"format": {"name": FORMAT_NAME, "version": self.format_version}, "runtimes": self.runtimes}

    @property
    def version(self) -> str:
        """Short content-hash version, e.g. 'sha256:1a2b3c4d5e6f'."""
        return f"sha256:{self.content_hash[:12]}"

    @property
    def temperature(self) -> float:
        """The calibration temperature: logits are divided by it before the softmax (1.0 = uncalibrated)."""
        return float(self.calibration["temperature"])

    def build_model(self, device: str | torch.device = "cpu") -> PetClassifier:
        """A PetClassifier with the bundle's weights, in eval mode, on `device`."""
        model = PetClassifier(len(self.class_names), arch=self.arch, weights="none", head=self.head)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def content_hash(
    arch: str, head: dict, class_names: list, preprocess: dict, state_dict: dict, answers: dict | None = None
) -> str:
    """sha256 over the metadata that defines predictions and every tensor's name, dtype, shape and bytes.

    `answers` holds the version-2 entries that change answers too (calibration, ood); None = version 1.
    """
    digest = hashlib.sha256()
    meta = {"arch": arch, "head": head, "class_names": list(class_names), "preprocess": preprocess}
    tensors = dict(state_dict)
    for key, entry in (answers or {}).items():
        entry = entry or {}
        meta[key] = {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"{key}.{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _answers(raw: dict) -> dict | None:
    """The hashed version-2 entries of a raw bundle dict (None for version 1)."""
    if raw["format"].get("version") == 1:
        return None
    return {"calibration": raw.get("calibration"), "ood": raw.get("ood")}


def _plain(value):
    """Round-trip through JSON so the bundle holds plain types only (weights_only-loadable)."""
    return json.loads(json.dumps(value, default=str))


def _plain_entry(entry: dict | None) -> dict | None:
    """Plain types, except tensors, which stay (contiguous, on the CPU)."""
    if entry is None:
        return None
    tensors = {k: v.detach().cpu().contiguous() for k, v in entry.items() if isinstance(v, torch.Tensor)}
    return {**_plain({k: v for k, v in entry.items() if k not in tensors}), **tensors}


def save_bundle(
    path: str | os.PathLike,
    model: PetClassifier,
    class_names: list[str],
    preprocess: dict,
    metrics: dict | None = None,
    training: dict | None = None,
    calibration: dict | None = None,
    ood: dict | None = None,
) -> str:
    """Write the bundle atomically and return its version string; calibration defaults to temperature 1.

    It carries no runtimes yet: models.training.export adds them (add_runtimes), tied to this content hash."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} outputs")
    validate_preprocess(preprocess)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    head = model.head_config.to_dict()
    bundle = {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "arch": model.arch,
        "head": head,
        "class_names": list(class_names),
        "preprocess": _plain(preprocess),
        "state_dict": state_dict,
        "metrics": _plain(metrics or {}),
        "training": _plain(training or {}),
        "calibration": _plain(calibration or UNCALIBRATED),
        "ood": _plain_entry(ood),
        "runtimes": {},
    }
    fields = (model.arch, head, bundle["class_names"], bundle["preprocess"], state_dict)
    bundle["content_hash"] = content_hash(*fields, _answers(bundle))
    atomic_save(bundle, path)
    return f"sha256:{bundle['content_hash'][:12]}"


def atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            torch.save(obj, tmp)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def add_runtimes(path: str | os.PathLike, content_hash: str, entries: dict[str, dict]) -> None:
    """Rewrite the bundle at `path` atomically carrying `entries` (RUNTIME_ENTRIES, made from the bundle whose
    content hash is `content_hash`) beside the ones it has; BundleError when the file now holds another bundle."""
    path = Path(path)
    raw = _read(path)
    _check_format(path, raw)
    if raw["content_hash"] != content_hash:
        raise BundleError(f"{path} was replaced (now sha256:{raw['content_hash'][:12]}) while its runtimes were made "
                          f"from sha256:{content_hash[:12]}; nothing written")  # fmt: skip
    tied = {name: {**entry, "bundle_hash": content_hash} for name, entry in entries.items()}
    raw["runtimes"] = {**(raw.get("runtimes") or {}), **tied}
    _check_runtimes(raw)  # what load_bundle will check: known entries only
    raw["format"] = {"name": FORMAT_NAME, "version": FORMAT_VERSION}  # the hash covers the same entries in 2 and 3
    atomic_save(raw, path)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise BundleError(f"model bundle {path} does not exist (train one with scripts/train.py)")
    try:
        # Memory-mapped: the runtimes a worker does not serve (100 MB for a ResNet-50 graph) are never read.
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for non-torch or unsafe files
        raise BundleError(f"{path} is not a model bundle: torch.load failed: {error}") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("format"), dict):
        raise BundleError(f"{path} is not a model bundle: no 'format' entry (a bare state_dict or checkpoint?)")
    return raw


def _check_format(path: Path, raw: dict) -> None:
    fmt = raw["format"]
    if fmt.get("name") != FORMAT_NAME:
        raise BundleError(f"{path} is not a model bundle: format name {fmt.get('name')!r}, expected {FORMAT_NAME!r}")
    if fmt.get("version") not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise BundleError(f"{path} has bundle format version {fmt.get('version')!r}; this code reads {readable}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise BundleError(f"{path} is missing required keys {missing}")


def _check_contents(path: Path, raw: dict) -> None:
    names = raw["class_names"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{path}: class_names must be a list of at least 2 strings, got {names!r}")
    if len(set(names)) != len(names):
        raise BundleError(f"{path}: class_names has duplicates: {names!r}")
    head_weights = [k for k in raw["state_dict"] if k.startswith("head.") and k.endswith(".weight")]
    last = max(head_weights, key=lambda k: int(k.split(".")[1]), default=None)
    outputs = raw["state_dict"][last].shape[0] if last else None
    if outputs != len(names):
        raise BundleError(f"{path}: {len(names)} class names but the head has {outputs} outputs")
    try:
        validate_preprocess(raw["preprocess"])
        HeadConfig.from_dict(raw["head"])
        _check_answers(raw)
        _check_runtimes(raw)
    except ValueError as error:
        raise BundleError(f"{path}: {error}") from error
    expected = content_hash(raw["arch"], raw["head"], names, raw["preprocess"], raw["state_dict"], _answers(raw))
    if expected != raw["content_hash"]:
        raise BundleError(f"{path}: content hash mismatch (file corrupted or edited after saving)")


def _check_answers(raw: dict) -> None:
    """Version 2: a positive finite temperature, and an ood entry a detector can be built from (or None)."""
    if _answers(raw) is None:
        return
    calibration = raw.get("calibration")
    temperature = calibration.get("temperature") if isinstance(calibration, dict) else None
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"calibration temperature must be a positive number, got {temperature!r}")
    if raw.get("ood") is not None:
        try:
            OodDetector.from_entry(raw["ood"])
        except (OodError, RuntimeError) as error:  # RuntimeError: a precision matrix that is not positive definite
            raise ValueError(f"unusable ood detector: {error}") from error


def _check_runtimes(raw: dict) -> None:
    """Version 3: only known entries, each made from this very bundle (its content hash)."""
    runtimes = raw.get("runtimes") or {}
    if not isinstance(runtimes, dict):
        raise ValueError(f"runtimes must be a dict of {', '.join(RUNTIME_ENTRIES)}, got {type(runtimes).__name__}")
    for name, entry in runtimes.items():
        if name not in RUNTIME_ENTRIES or not isinstance(entry, dict):
            raise ValueError(f"unknown runtime entry {name!r}; valid: {', '.join(RUNTIME_ENTRIES)}")
        if entry.get("bundle_hash") != raw["content_hash"]:
            made = str(entry.get("bundle_hash"))[:12]
            raise ValueError(f"its {name} runtime was made from another bundle (sha256:{made}), not this one")


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read and validate a bundle with torch.load(weights_only=True); raise BundleError on any problem."""
    path = Path(path)
    raw = _read(path)
    _check_format(path, raw)
    _check_contents(path, raw)
    return Bundle(
        path=str(path),
        arch=raw["arch"],
        head=raw["head"],
        class_names=list(raw["class_names"]),
        preprocess=raw["preprocess"],
        state_dict=raw["state_dict"],
        content_hash=raw["content_hash"],
        metrics=raw.get("metrics") or {},
        training=raw.get("training") or {},
        # Version 1 had neither: temperature 1 (uncalibrated) and no detector (nothing flagged unknown).
        calibration=raw.get("calibration") or dict(UNCALIBRATED),
        # Requests read the detector's tensors: copied out of the mapped file, which may be replaced after loading.
        ood=_owned(raw.get("ood")),
        runtimes=raw.get("runtimes") or {},
        format_version=raw["format"]["version"],
    )


def _owned(entry: dict | None) -> dict | None:
    """The entry with its tensors copied into memory (out of a memory-mapped file)."""
    if entry is None:
        return None
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PetClassifier, Bundle]:
    """Load a bundle and build its model on `device` in eval mode."""
    bundle = load_bundle(path)
    try:
        return bundle.build_model(device), bundle
    except (RuntimeError, ValueError) as error:
        raise BundleError(f"{path}: weights do not fit {bundle.arch} with head {bundle.head}: {error}") from error
