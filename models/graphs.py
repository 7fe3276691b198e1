"""ONNX graphs a bundle carries: what they must hold, how they are read and checked, and why one cannot serve.
Imports no torch.

A bundle carries its graphs in its `runtimes` entry (`onnxruntime/fp32`, `onnxruntime/int8`, models/bundle.py),
written by training and by scripts/export.py, so a bundle never meets a graph of another one. Bundles of format 1
and 2 had them beside the file (`models/pet_classifier.fp32.onnx`), which they still read, when made from them, until
`scripts/export.py --upgrade` moves them in. Each graph takes `images` (batch, 3, crop, crop) float32, normalised,
and returns `logits` (batch, classes) and `features` (batch, width), the penultimate features OOD scores read, with
a dynamic batch axis. Its metadata ties it to the bundle's content hash and records what export measured.

A graph is untrusted input, like the bundle: one that names external data (a file elsewhere on the server) or
operators outside ONNX's and ONNX Runtime's own domains is refused before ONNX Runtime opens it. The gunicorn
master checks graphs here before any worker forks, so this module needs neither torch nor the bundle loader: the
bundle's plain entries and a graph's bytes are read from its zip without unpickling tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

GRAPH_PRECISIONS = ("fp32", "int8")  # what ONNX Runtime serves; bf16/fp16 stay on PyTorch
GRAPH_FORMAT = "pet-classifier-onnx/1"
INPUT, OUTPUTS = "images", ("logits", "features")
META_FORMAT, META_HASH = "petclf.format", "petclf.bundle_hash"
META_PRECISION, META_INFO = "petclf.precision", "petclf.info"
ORT_PIN = "onnxruntime==1.32.0"  # the version requirements.txt pins
# Operator domains a graph may use: ONNX's own and ONNX Runtime's built-in contrib operators; anything else would
# need a custom-operator library, which this service never loads.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


class GraphError(ValueError):
    """A graph is missing, unreadable, stale or does not fit its bundle; the message names the fix."""


def entry_name(precision: str) -> str:
    """The bundle's runtimes entry for the graph of `precision`: 'onnxruntime/fp32'."""
    return f"onnxruntime/{precision}"


def carries_inside(header: dict) -> bool:
    """Whether a bundle of this header (bundle_header, or a loaded bundle's format) carries its runtimes (format 3)
    rather than having them beside it (formats 1 and 2)."""
    return header.get("format", {}).get("version", 0) >= 3


def graph_path(bundle_path: str | os.PathLike, precision: str) -> Path:
    """Where format-1/2 bundles had their graphs: models/pet_classifier.pt -> models/pet_classifier.fp32.onnx."""
    path = Path(bundle_path)
    return path.with_name(f"{path.stem}.{precision}.onnx")


def export_command(bundle_path: str | os.PathLike, data_dir: str | None = None) -> str:
    """The command that writes a bundle's graphs into it (int8 needs the training data it calibrates on)."""
    return f"python scripts/export.py --model {bundle_path} --data-dir {data_dir or 'DIR (its training data)'}"


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a bundle read without torch: where its bytes lie in the zip (`data/<key>`), and its extent."""

    key: str
    offset: int  # in elements
    numel: int
    dtype: str  # the storage class, e.g. 'ByteStorage'


def _tensor_ref(storage, offset, size, *args, **kwargs) -> TensorRef | None:
    numel = 1
    for extent in size:
        numel *= extent
    return TensorRef(storage[1], offset, numel, storage[0]) if isinstance(storage, tuple) else None


class _PlainUnpickler(pickle.Unpickler):
    """Reads a torch.save'd dict without torch: tensors become TensorRefs, any other class is refused (no code
    runs)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_ref
        if module.startswith("torch"):
            return name if name.endswith("Storage") else (lambda *args, **kwargs: None)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in a bundle")

    def persistent_load(self, pid):
        return (pid[1], str(pid[2])) if isinstance(pid, tuple) and pid[:1] == ("storage",) else None


def _pickle_name(archive: zipfile.ZipFile) -> str:
    return next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")


def bundle_header(bundle_path: str | os.PathLike) -> dict:
    """A bundle's plain entries (content_hash, class_names, preprocess, runtimes...), read without torch: each
    tensor is a TensorRef."""
    with zipfile.ZipFile(bundle_path) as archive, archive.open(_pickle_name(archive)) as handle:
        raw = _PlainUnpickler(handle).load()
    if not isinstance(raw, dict):
        raise ValueError(f"{bundle_path} is not a model bundle")
    return raw


def read_tensor_bytes(bundle_path: str | os.PathLike, ref: TensorRef) -> bytes:
    """The bytes of a uint8 tensor of the bundle (a graph), read from its zip without torch."""
    if ref.dtype != "ByteStorage":
        raise GraphError(f"a graph is stored as uint8 bytes, not {ref.dtype}")
    with zipfile.ZipFile(bundle_path) as archive:
        prefix = _pickle_name(archive).rpartition("data.pkl")[0]
        data = archive.read(f"{prefix}data/{ref.key}")
    return data[ref.offset : ref.offset + ref.numel]


@dataclass(frozen=True)
class Graph:
    """A graph's bytes and where they came from ('pet.pt:onnxruntime/fp32', or an older bundle's file beside it)."""

    data: bytes
    where: str


def graph_entry(data: bytes, info: dict) -> dict:
    """The plain part of a runtimes entry for a graph (the caller adds the bytes as a uint8 tensor, `graph`)."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "info": info}


def carried(bundle_path: str | os.PathLike, header: dict, precision: str, read=None) -> Graph | None:
    """The graph for `precision` the bundle carries (format 1/2: the file beside it), else None; `read(entry)`
    gives an entry's bytes (default: from the zip, without torch). Raises GraphError for a damaged entry."""
    name = os.path.basename(bundle_path)
    if not carries_inside(header):
        path = graph_path(bundle_path, precision)
        return Graph(path.read_bytes(), str(path)) if path.is_file() else None
    entry = (header.get("runtimes") or {}).get(entry_name(precision))
    if entry is None:
        return None
    data = read(entry) if read else read_tensor_bytes(bundle_path, entry["graph"])
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise GraphError(f"{name}:{entry_name(precision)} graph is damaged (its sha256 differs from the recorded "
                         f"one); make it again with: {export_command(bundle_path)}")  # fmt: skip
    return Graph(data, f"{name}:{entry_name(precision)}")


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


def untrusted_problem(data: bytes) -> str | None:
    """Why a graph's bytes must not be opened (external data: a path to a file elsewhere; a custom operator
    domain), else None. Parsed by onnx without loading any external data."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)  # from bytes: no external data is ever read
    except Exception as error:  # protobuf's DecodeError and onnx's own
        return f"is not a readable ONNX graph ({' '.join(str(error).split())[:200]})"
    # The operators used, not the opsets declared: ORT's quantizer declares domains (training, preview) it never uses.
    graphs, tensors, domains = [model.graph], [], set()
    while graphs:
        graph = graphs.pop()
        tensors += [*graph.initializer, *(sparse.values for sparse in graph.sparse_initializer)]
        for node in graph.node:
            domains.add(node.domain)
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors] if attribute.HasField("t") else list(attribute.tensors)
                graphs += [attribute.g, *attribute.graphs] if attribute.HasField("g") else list(attribute.graphs)
    for function in model.functions:
        domains |= {node.domain for node in function.node}
    external = [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)]
    if external:
        where = {entry.key: entry.value for entry in external[0].external_data}.get("location", "?")
        return f"names external data ({external[0].name!r} in {where!r}); a graph must hold all of its weights"
    unknown = sorted(domains - KNOWN_DOMAINS - {function.domain for function in model.functions})
    if unknown:
        return f"uses operators of domains {unknown}, which need a custom-operator library; this service loads none"
    return None


def open_session(data: bytes, threads: int = 1, optimize: bool = True):
    """An ONNX Runtime CPU session for a graph's bytes (checked with untrusted_problem first): `threads` intra-op
    threads, one inter-op (sequential)."""
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
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


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


def check_graph(graph: Graph, header: dict, precision: str, bundle_path: str | os.PathLike = "") -> dict:
    """Check the graph's bytes (untrusted_problem), open them and check them against the bundle `header`
    (bundle_header); returns the graph's recorded info. Raises GraphError naming it, what is wrong and the fix."""
    command = export_command(bundle_path or "BUNDLE", (header.get("training") or {}).get("data_dir"))
    problem = untrusted_problem(graph.data)
    if problem:
        raise GraphError(f"{graph.where} {problem}; make it again with: {command}")
    try:
        session = open_session(graph.data, optimize=False)
    except GraphError:
        raise
    except Exception as error:  # ORT raises its own types for unreadable, truncated or invalid graphs
        reason = " ".join(str(error).split())[:200]  # one line: the master prints the child's last line
        raise GraphError(
            f"{graph.where} is not a readable ONNX graph ({reason}); make it again with: {command}"
        ) from error
    meta = session.get_modelmeta().custom_metadata_map
    content_hash = str(header.get("content_hash"))
    if meta.get(META_FORMAT) != GRAPH_FORMAT or meta.get(META_PRECISION) != precision:
        found = f"format {meta.get(META_FORMAT)!r}, precision {meta.get(META_PRECISION)!r}"
        raise GraphError(f"{graph.where} is not a {precision} graph ({GRAPH_FORMAT}): {found}; make it again with: "
                         f"{command}")  # fmt: skip
    if meta.get(META_HASH) != content_hash:
        raise GraphError(
            f"{graph.where} was made from another bundle (sha256:{str(meta.get(META_HASH))[:12]}) than {bundle_path} "
            f"(sha256:{content_hash[:12]}); make it again with: {command}"
        )
    problem = _shape_problem(session, int(header["preprocess"]["crop"]), len(header["class_names"]))
    if problem:
        raise GraphError(f"{graph.where} {problem}; make it again with: {command}")
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
    try:
        header = bundle_header(bundle_path)
    except Exception:  # an unreadable bundle is reported by the bundle loader itself
        return None
    try:
        graph = carried(bundle_path, header, precision)
        if graph is None:
            return None if backend == "auto" else missing_graph(bundle_path, precision)
        check_graph(graph, header, precision, bundle_path)
    except GraphError as error:
        return str(error)
    return None


def missing_graph(bundle_path: str | os.PathLike, precision: str) -> str:
    """Why BACKEND=onnxruntime cannot serve a bundle that carries no graph for `precision`, and the fix."""
    command = export_command(bundle_path)
    return f"backend onnxruntime: {bundle_path} carries no {precision} graph; make it with: {command}"


def graph_state(bundle_path: str | os.PathLike) -> str:
    """'carried' (the bundle carries its fp32 graph), 'beside' (format 1/2 with graphs beside it, for
    `scripts/export.py --upgrade`) or 'none'; scripts/ensure_model.sh asks. Raises for a file that is no bundle."""
    header = bundle_header(bundle_path)
    if not carries_inside(header):
        return "beside" if any(carries(bundle_path, p, header) for p in GRAPH_PRECISIONS) else "none"
    return "carried" if carries(bundle_path, "fp32", header) else "none"


def carries(bundle_path: str | os.PathLike, precision: str, header: dict | None = None) -> bool:
    """Whether the bundle carries a graph for `precision` (format 1/2: has one beside it); cheap, torch-free.
    `header`: its plain entries (format, runtimes) when already read."""
    if precision not in GRAPH_PRECISIONS:
        return False
    try:
        header = bundle_header(bundle_path) if header is None else header
    except Exception:  # an unreadable bundle is reported by the bundle loader itself
        return False
    if not carries_inside(header):
        return graph_path(bundle_path, precision).is_file()
    return entry_name(precision) in (header.get("runtimes") or {})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
