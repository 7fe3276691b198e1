"""ONNX graphs beside a bundle: where they live, what they must hold, and why one cannot serve. Imports no torch.

A bundle `models/pet_classifier.pt` has `models/pet_classifier.fp32.onnx` and `models/pet_classifier.int8.onnx`
(scripts/export.py writes them). Each graph takes `images` (batch, 3, crop, crop) float32, normalised, and
returns `logits` (batch, classes) and `features` (batch, width), the penultimate features OOD scores read, with a
dynamic batch axis. Its metadata ties it to the bundle's content hash and records what export measured. The
gunicorn master checks graphs here before any worker forks, so this module needs neither torch nor onnx: the
bundle's plain entries are read from its zip without unpickling tensors, the graph is opened by ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

GRAPH_PRECISIONS = ("fp32", "int8")  # what ONNX Runtime serves; bf16/fp16 stay on PyTorch
GRAPH_FORMAT = "pet-classifier-onnx/1"
INPUT, OUTPUTS = "images", ("logits", "features")
META_FORMAT, META_HASH = "petclf.format", "petclf.bundle_hash"
META_PRECISION, META_INFO = "petclf.precision", "petclf.info"
ORT_PIN = "onnxruntime==1.32.0"  # the version requirements.txt pins


class GraphError(ValueError):
    """A graph is missing, unreadable, stale or does not fit its bundle; the message names the fix."""


def graph_path(bundle_path: str | os.PathLike, precision: str) -> Path:
    """models/pet_classifier.pt -> models/pet_classifier.<precision>.onnx."""
    path = Path(bundle_path)
    return path.with_name(f"{path.stem}.{precision}.onnx")


def export_command(bundle_path: str | os.PathLike, data_dir: str | None = None) -> str:
    """The command that writes a bundle's graphs (int8 needs the training data it calibrates on)."""
    return f"python scripts/export.py --model {bundle_path} --data-dir {data_dir or 'DIR (its training data)'}"


class _PlainUnpickler(pickle.Unpickler):
    """Reads a torch.save'd dict without torch: tensors become None, any other class is refused (no code runs)."""

    def find_class(self, module, name):
        if module.startswith("torch"):
            return lambda *args, **kwargs: None
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in a bundle")

    def persistent_load(self, pid):
        return None


def bundle_header(bundle_path: str | os.PathLike) -> dict:
    """A bundle's plain entries (content_hash, class_names, preprocess, training...), read without torch."""
    with zipfile.ZipFile(bundle_path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        with archive.open(name) as handle:
            raw = _PlainUnpickler(handle).load()
    if not isinstance(raw, dict):
        raise ValueError(f"{bundle_path} is not a model bundle")
    return raw


def import_onnxruntime():
    """The onnxruntime module; GraphError naming the install command when it is missing."""
    try:
        import onnxruntime
    except ImportError as error:
        raise GraphError(
            f"onnxruntime is not installed ({error}); install it with: pip install {ORT_PIN} (requirements.txt), "
            "or serve with PyTorch: BACKEND=torch"
        ) from error
    return onnxruntime


def open_session(path: str | os.PathLike, threads: int = 1, optimize: bool = True):
    """An ONNX Runtime CPU session for the graph: `threads` intra-op threads, one inter-op (sequential)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No spinning between runs: a spinning pool takes the cores the request threads decode on (the int8 service
    # at 32 clients spent twice the raw forward's CPU per image with it; the raw forward loses ~6% without it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _shape_problem(session, crop: int, classes: int) -> str | None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if list(inputs) != [INPUT] or sorted(outputs) != sorted(OUTPUTS):
        return f"has inputs {list(inputs)} and outputs {sorted(outputs)}; expected [{INPUT!r}] and {sorted(OUTPUTS)}"
    image = inputs[INPUT]
    if image.type != "tensor(float)" or list(image.shape[1:]) != [3, crop, crop] or isinstance(image.shape[0], int):
        return f"takes {image.type} {image.shape}; the bundle needs float [batch, 3, {crop}, {crop}] (dynamic batch)"
    logits = outputs["logits"].shape
    if len(logits) != 2 or logits[1] != classes:
        return f"returns logits {logits}; the bundle has {classes} classes"
    return None


def check_graph(path: str | os.PathLike, header: dict, precision: str, bundle_path: str | os.PathLike = "") -> dict:
    """Open the graph and check it against the bundle `header` (bundle_header); returns its recorded info.

    Raises GraphError naming the file, what is wrong and the command that remakes it.
    """
    path = Path(path)
    command = export_command(bundle_path or "BUNDLE", (header.get("training") or {}).get("data_dir"))
    if not path.is_file():
        raise GraphError(f"no {precision} graph at {path}; make it with: {command}")
    try:
        session = open_session(path, optimize=False)
    except GraphError:
        raise
    except Exception as error:  # ORT raises its own types for unreadable, truncated or invalid graphs
        reason = " ".join(str(error).split())[:200]  # one line: the master prints the child's last line
        raise GraphError(f"{path} is not a readable ONNX graph ({reason}); make it again with: {command}") from error
    meta = session.get_modelmeta().custom_metadata_map
    content_hash = str(header.get("content_hash"))
    if meta.get(META_FORMAT) != GRAPH_FORMAT or meta.get(META_PRECISION) != precision:
        found = f"format {meta.get(META_FORMAT)!r}, precision {meta.get(META_PRECISION)!r}"
        raise GraphError(f"{path} is not a {precision} graph ({GRAPH_FORMAT}): {found}; make it again with: {command}")
    if meta.get(META_HASH) != content_hash:
        raise GraphError(
            f"{path} was made from another bundle (sha256:{str(meta.get(META_HASH))[:12]}) than {bundle_path} "
            f"(sha256:{content_hash[:12]}); make it again with: {command}"
        )
    problem = _shape_problem(session, int(header["preprocess"]["crop"]), len(header["class_names"]))
    if problem:
        raise GraphError(f"{path} {problem}; make it again with: {command}")
    return json.loads(meta.get(META_INFO) or "{}")


def main(argv: list[str]) -> int:
    """`python -m models.graphs PRECISION BACKEND BUNDLE...`: exit 0, or 2 with the first problem on stderr."""
    precision, backend, *paths = argv
    problem = next(filter(None, (graph_problem(path, precision, backend) for path in paths)), None)
    if problem:
        print(f"BACKEND={backend} PRECISION={precision}: {problem}", file=sys.stderr)
        return 2
    return 0


def graph_problem(bundle_path: str | os.PathLike, precision: str, backend: str) -> str | None:
    """Start-up check (gunicorn master): why `backend` (auto/onnxruntime) cannot serve the bundle's graph for
    `precision`, else None. auto without a graph is fine (PyTorch serves); a graph that is there must be usable."""
    if backend == "torch":
        return None
    if precision not in GRAPH_PRECISIONS:
        return f"ONNX Runtime serves {' and '.join(GRAPH_PRECISIONS)}, not {precision}" if backend != "auto" else None
    path = graph_path(bundle_path, precision)
    if backend == "auto" and not path.exists():
        return None
    try:
        header = bundle_header(bundle_path)
    except Exception:  # an unreadable bundle is reported by the bundle loader itself
        return None
    try:
        check_graph(path, header, precision, bundle_path)
    except GraphError as error:
        return str(error)
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
