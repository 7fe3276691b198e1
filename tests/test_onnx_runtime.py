"""ONNX Runtime on the CPU: export of every architecture family, the graphs beside a bundle, the one loader's
choice of runtime, serving through it, and start-up refusing bad graphs before any worker forks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from app import get_service
from app.config import load_settings, measures_backends
from app.model_watch import ModelWatch, signature
from models.bundle import BundleError, add_runtimes, atomic_save, load_bundle, load_model, save_bundle
from models.choice import faster, trial_images
from models.graphs import (
    Graph,
    GraphError,
    bundle_header,
    carried,
    check_graph,
    graph_entry,
    graph_path,
    graph_problem,
    untrusted_problem,
)
from models.loader import choose_backend, load_predictor
from models.onnx_runtime import OnnxNetwork
from models.pet_classifier import PetClassifier
from models.quantize import ENTRY, int8_entry, quantize
from models.training.agreement import batches
from models.training.data import DataError, discover
from models.training.export import export_bundle, export_fp32
from models.transforms import default_preprocess
from tests.fixtures.training import FIXTURE, run_train
from tests.helpers import REPO_ROOT, legacy_bundle, poll_readyz, start_server
from tools import soak

CPU = torch.device("cpu")


@pytest.mark.numerics  # ONNX Runtime's kernels differ by CPU too: .ci/run repeats these on AVX2
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_every_architecture_family_exports_and_matches_pytorch(arch, tmp_path):
    torch.manual_seed(0)
    model = PetClassifier(3, arch=arch, head={"hidden": 16}).eval()
    path = export_fp32(model, 32, tmp_path / "graph.onnx")
    network = OnnxNetwork(Graph(path.read_bytes(), path.name), "fp32")
    images = torch.randn(5, 3, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    logits, features = network(images)
    with torch.inference_mode():
        expected_features = model.backbone(images)
        expected = model.head(expected_features)
    assert logits.shape == (5, 3) and features.shape == expected_features.shape
    torch.testing.assert_close(torch.softmax(logits, 1), torch.softmax(expected, 1), atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


@pytest.fixture(scope="module")
def exported(training_data, tmp_path_factory) -> tuple[Path, dict]:
    """A bundle as training leaves it by default: carrying its fp32 graph and its int8 graph calibrated on the
    training images, each measured on held-out ones."""
    output = tmp_path_factory.mktemp("graphs") / "bundle.pt"
    summary = run_train(training_data, output, **FIXTURE, graphs="fp32,int8")  # what TrainConfig defaults to
    return output, summary["runtimes"]


def test_training_writes_both_graphs_into_the_bundle_with_their_agreement(exported):
    bundle, runtimes = exported
    header = bundle_header(bundle)
    loaded = load_bundle(bundle)
    assert header["content_hash"] == loaded.content_hash  # read without unpickling tensors
    assert loaded.format_version == 3 and sorted(loaded.runtimes) == ["onnxruntime/fp32", "onnxruntime/int8"]
    assert not list(bundle.parent.glob("*.onnx"))  # one file: nothing beside it
    for precision in ("fp32", "int8"):
        graph = carried(bundle, header, precision)
        assert graph.where == f"bundle.pt:onnxruntime/{precision}"
        info = check_graph(graph, header, precision, bundle)
        measured = info["agreement"][precision]
        assert measured == runtimes[f"onnxruntime/{precision}"]["agreement"][precision] and measured["images"] == 60
        assert loaded.runtimes[f"onnxruntime/{precision}"]["bundle_hash"] == loaded.content_hash
    fp32 = runtimes["onnxruntime/fp32"]["agreement"]["fp32"]
    assert fp32["agreement"] == 1.0 and fp32["max_probability_difference"] <= 1e-4
    assert runtimes["onnxruntime/int8"]["calibration"]["images"] == 240
    assert runtimes["onnxruntime/int8"]["agreement"]["int8"]["agreement"] >= 0.9  # int8 may flip near-ties


@pytest.mark.numerics
def test_the_loader_serves_graphs_on_the_cpu_as_pytorch_does(exported, training_data):
    bundle, _ = exported
    split = discover(training_data, 0.2, 0)
    images = next(batches(split.val[:12], load_bundle(bundle).preprocess, 12, 0))  # held-out, eval-transformed
    torch_fp32 = load_predictor(bundle, CPU, "fp32", "torch")
    ort_fp32 = load_predictor(bundle, CPU, "fp32", "onnxruntime")
    assert ort_fp32.backends == ("onnxruntime",) and torch_fp32.backends == ("torch",)
    expected, served = torch_fp32.predictor(images), ort_fp32.predictor(images)
    torch.testing.assert_close(served.probs, expected.probs, atol=1e-4, rtol=0)
    assert torch.equal(served.probs.argmax(1), expected.probs.argmax(1))
    torch.testing.assert_close(served.ood_scores, expected.ood_scores, rtol=1e-3, atol=1e-3)
    # A prediction does not depend on its batch: one image alone = the same image in the batch.
    torch.testing.assert_close(ort_fp32.predictor(images[3:4]).probs, served.probs[3:4], atol=1e-4, rtol=0)
    int8 = load_predictor(bundle, CPU, "int8", "onnxruntime")
    assert int8.members[0]["graph"] == "bundle.pt:onnxruntime/int8" and int8.members[0]["agreement"]["images"] == 60
    assert int8.predictor(images).probs.shape == expected.probs.shape


def test_export_rewrites_the_one_file_and_keeps_its_version(bundle_copy):
    before = load_bundle(bundle_copy)
    report = export_bundle(bundle_copy, precisions=("fp32",))
    after = load_bundle(bundle_copy)
    assert after.version == before.version == report["version"] and sorted(after.runtimes) == ["onnxruntime/fp32"]
    assert report["runtimes"]["onnxruntime/fp32"]["bytes"] > 0 and "agreement" not in report["runtimes"]
    assert [p.name for p in bundle_copy.parent.iterdir()] == [bundle_copy.name]  # no temporary file left
    with pytest.raises(DataError, match="int8 is calibrated on the bundle's training images"):
        export_bundle(bundle_copy, precisions=("int8",))


def test_a_runtime_made_from_another_bundle_is_refused(bundle_copy, tmp_path):
    other = _other_bundle(tmp_path / "other.pt")
    with pytest.raises(BundleError, match="was replaced .* nothing written"):
        add_runtimes(bundle_copy, load_bundle(other).content_hash, {"onnxruntime/fp32": {}})
    raw = torch.load(bundle_copy, weights_only=True)
    raw["runtimes"] = {"onnxruntime/fp32": {"bundle_hash": load_bundle(other).content_hash}}
    atomic_save(raw, bundle_copy)
    with pytest.raises(BundleError, match="onnxruntime/fp32 runtime was made from another bundle"):
        load_bundle(bundle_copy)


def test_older_bundles_with_graphs_beside_them_load_and_upgrade_into_one_file(exported, tmp_path):
    bundle, _ = exported
    old = legacy_bundle(bundle, tmp_path / "old.pt")
    assert load_bundle(old).format_version == 2 and (tmp_path / "old.fp32.onnx").is_file()
    beside = load_predictor(old, CPU, "int8", "onnxruntime").members[0]
    assert beside["graph"] == str(tmp_path / "old.int8.onnx")
    result = subprocess.run(
        [sys.executable, "scripts/export.py", "--model", str(old), "--upgrade"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["upgraded"] and report["carries"] == ["onnxruntime/fp32", "onnxruntime/int8"]
    assert [p.name for p in tmp_path.iterdir()] == ["old.pt"]  # the graphs moved in
    upgraded = load_bundle(old)
    assert upgraded.format_version == 3 and upgraded.version == load_bundle(bundle).version
    assert load_predictor(old, CPU, "int8", "onnxruntime").members[0]["graph"] == "old.pt:onnxruntime/int8"


def test_backend_choice_says_why(bundle_copy):
    bundle = load_bundle(bundle_copy)
    runtime, why = choose_backend(bundle, CPU, "fp32", "auto")
    assert runtime == "torch" and "carries no fp32 graph" in why and "python scripts/export.py" in why
    with pytest.raises(GraphError, match="carries no int8 graph; make it with: python scripts/export.py"):
        choose_backend(bundle, CPU, "int8", "onnxruntime")
    assert choose_backend(bundle, torch.device("cuda"), "fp32", "auto")[0] == "torch"
    assert choose_backend(bundle, CPU, "bf16", "auto")[0] == "torch"
    with pytest.raises(GraphError, match="CPU only"):
        choose_backend(bundle, torch.device("cuda"), "fp32", "onnxruntime")


def _other_bundle(path: Path, classes: int = 3, crop: int = 64) -> Path:
    torch.manual_seed(1)
    model = PetClassifier(classes, arch="resnet18", head={"hidden": 0}).eval()
    save_bundle(path, model, [f"c{i}" for i in range(classes)], default_preprocess(crop))
    return path


def _carrying(path: Path, data: bytes, **entry) -> Path:
    """The bundle at `path` rewritten to carry `data` as its fp32 graph (sha256 and size as recorded)."""
    graph = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    plain = {**graph_entry(data, {}), **entry}
    add_runtimes(path, load_bundle(path).content_hash, {"onnxruntime/fp32": {**plain, "graph": graph}})
    return path


def _retagged(data: bytes, content_hash: str, external: str | None = None) -> bytes:
    """The graph `data` tagged as made from `content_hash`; `external`: its first weight moved to that file."""
    import onnx
    from onnx.external_data_helper import set_external_data

    from models.graphs import META_HASH

    model = onnx.load_model_from_string(data)
    for entry in model.metadata_props:
        if entry.key == META_HASH:
            entry.value = content_hash
    if external:
        weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        set_external_data(weight, location=external)
        weight.data_location = onnx.TensorProto.EXTERNAL
        weight.ClearField("raw_data")
    return model.SerializeToString()


@pytest.fixture(scope="module")
def bad_graphs(exported, tmp_path_factory) -> dict[str, Path]:
    """Bundles carrying an fp32 graph that is stale, truncated, not ONNX at all, shaped for other inputs/outputs,
    damaged after writing, or pointing at a file elsewhere; and a format-2 bundle with a stale graph beside it."""
    bundle, _ = exported
    folder = tmp_path_factory.mktemp("bad")
    graph = bytes(load_bundle(bundle).runtimes["onnxruntime/fp32"]["graph"].numpy())
    cases = {name: _other_bundle(folder / f"{name}.pt") for name in
             ("stale", "truncated", "garbage", "damaged", "external", "legacy")}  # fmt: skip
    _carrying(cases["stale"], graph)  # tagged with the training run's bundle
    _carrying(cases["truncated"], graph[: len(graph) // 2])
    _carrying(cases["garbage"], b"not an onnx graph" * 100)
    _carrying(cases["damaged"], graph, sha256="0" * 64)
    # A weight "stored" in /etc/passwd: opening it would read a file outside the bundle.
    _carrying(cases["external"], _retagged(graph, load_bundle(cases["external"]).content_hash, "/etc/passwd"))
    legacy_bundle(_carrying(cases["legacy"], graph), cases["legacy"])  # format 2, the stale graph beside it
    mismatched = export_bundle(_other_bundle(folder / "mismatched-source.pt", classes=5, crop=32), precisions=("fp32",))
    source = load_bundle(mismatched["model"]).runtimes["onnxruntime/fp32"]["graph"].numpy().tobytes()
    cases["mismatched"] = _other_bundle(folder / "mismatched.pt", classes=3, crop=64)
    # The 5-class, 32-pixel graph retagged with this bundle's hash: only its inputs and outputs are wrong.
    _carrying(cases["mismatched"], _retagged(source, load_bundle(cases["mismatched"]).content_hash))
    return cases


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("stale", "was made from another bundle"),
        ("truncated", "is not a readable ONNX graph"),
        ("garbage", "is not a readable ONNX graph"),
        ("mismatched", "takes tensor(float)"),
        ("damaged", "graph is damaged (its sha256 differs"),
        ("external", "names external data ("),
        ("legacy", "was made from another bundle"),
    ],
)
def test_a_bad_graph_stops_the_master_before_any_worker(bad_graphs, case, message, tmp_path):
    bundle = bad_graphs[case]
    assert message in graph_problem(bundle, "fp32", "auto")
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--check-config", "-c", "gunicorn.conf.py", "app:create_app()"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MODEL_PATH": str(bundle), "DEVICE": "cpu", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode != 0 and "configuration error: BACKEND=auto PRECISION=fp32:" in result.stderr
    where = str(graph_path(bundle, "fp32")) if case == "legacy" else f"{bundle.name}:onnxruntime/fp32"
    assert where in result.stderr and "python scripts/export.py" in result.stderr
    assert "Traceback" not in result.stderr
    # A worker loading it (without the master's check) refuses it the same way, before ONNX Runtime opens it.
    with pytest.raises(GraphError, match=re.escape(message)):
        load_predictor(bundle, CPU, "fp32", "onnxruntime")


def test_a_graph_naming_external_data_is_refused_before_anything_reads_it(bad_graphs):
    data = load_bundle(bad_graphs["external"]).runtimes["onnxruntime/fp32"]["graph"].numpy().tobytes()
    problem = untrusted_problem(data)
    assert "names external data" in problem and "'/etc/passwd'" in problem
    assert untrusted_problem(_retagged(data, "x")) is not None  # still external after retagging


def test_missing_onnxruntime_stops_the_master(exported, tmp_path):
    bundle, _ = exported
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ImportError('onnxruntime removed for this test')\n")
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--check-config", "-c", "gunicorn.conf.py", "app:create_app()"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MODEL_PATH": str(bundle), "DEVICE": "cpu", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
             "PYTHONPATH": f"{shadow}{os.pathsep}{REPO_ROOT}"},
    )  # fmt: skip
    assert result.returncode != 0 and "onnxruntime is not installed" in result.stderr
    assert "pip install onnxruntime==" in result.stderr and "BACKEND=torch" in result.stderr


def test_the_server_serves_through_onnx_runtime_and_falls_back_without_a_graph(exported, bundle_copy, tmp_path):
    bundle, _ = exported
    photo = (REPO_ROOT / "tests" / "data" / "chelsea.jpg").read_bytes()
    for model, backend in ((bundle, "onnxruntime"), (bundle_copy, "torch")):
        (tmp_path / backend).mkdir()
        # BACKEND=auto with both runtimes able to serve would time them (tested below): ONNX Runtime is asked for.
        asked = "onnxruntime" if backend == "onnxruntime" else "auto"
        server = start_server(model, tmp_path / backend, workers=1, DEVICE="cpu", BACKEND=asked)
        try:
            poll_readyz(server)
            (member,) = requests.get(f"{server.url}/model", timeout=30).json()["members"]
            assert member["backend"] == backend and member["precision"] == "fp32"
            response = requests.post(f"{server.url}/predict", data=photo, headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200 and response.json()["predicted_class"]
        finally:
            server.stop()
        if backend == "torch":  # auto without a graph: PyTorch serves, and the log says why
            assert "carries no fp32 graph" in server.log() and "python scripts/export.py" in server.log()
        else:
            assert member["graph"] == "bundle.pt:onnxruntime/fp32" and member["agreement"]["agreement"] == 1.0


@pytest.mark.numerics
def test_evaluation_measures_the_int8_that_is_served(exported, training_data, tmp_path):
    from models.training.evaluation import evaluate_bundle

    bundle, _ = exported
    served = evaluate_bundle(bundle, training_data, tmp_path / "int8", workers=0, device="cpu", precision="int8")
    pytorch = evaluate_bundle(bundle, training_data, tmp_path / "fp32", workers=0, device="cpu", backend="torch")
    assert (served["precision"], served["backends"]) == ("int8", ["onnxruntime"])
    assert pytorch["backends"] == ["torch"] and served["images"] == pytorch["images"]
    assert abs(served["accuracy"] - pytorch["accuracy"]) <= 0.1  # int8 flips few of these images, if any


# BACKEND=auto on the CPU: where both runtimes can serve a precision, the faster one on this machine serves.


@pytest.fixture(scope="module")
def both_runtimes(exported, tmp_path_factory) -> Path:
    """The trained bundle carrying its graphs and a PyTorch int8 network too: two candidates for fp32 and int8."""
    source, _ = exported
    bundle = Path(shutil.copy(source, tmp_path_factory.mktemp("both") / "both.pt"))
    model, loaded = load_model(bundle)
    crop = loaded.preprocess["crop"]
    quantized = quantize(model, [trial_images(8, crop)], crop)  # timing only: calibrated on noise
    entry = int8_entry(quantized, loaded, {"calibration": {"images": 8, "data": "noise, for timing"}})
    add_runtimes(bundle, loaded.content_hash, {ENTRY: entry})
    return bundle


def _assert_measured(member: dict, precision: str) -> dict:
    """The member was timed on both runtimes and is served by the faster; returns the figures."""
    measured = member["measured"]
    figures = {name: one["ms_per_image"] for name, one in measured["candidates"].items()}
    assert set(figures) == {"onnxruntime", "torch"} and all(ms > 0 for ms in figures.values())
    assert member["backend"] == measured["backend"] == min(figures, key=figures.get)
    assert member["reason"].startswith(f"{precision}: onnxruntime ") and member["reason"].endswith(member["backend"])
    assert "ms per image" in member["reason"] and f"at batch {measured['batch']}" in member["reason"]
    return measured


def test_choice_keeps_the_faster_of_the_candidates(exported):
    predictor = load_predictor(exported[0], CPU, "fp32", "torch").predictor
    images = trial_images(4, 64)
    measured = faster({"slow": lambda x: [predictor(x) for _ in range(4)], "fast": predictor}, images, threads=1)
    assert measured.backend == "fast" and measured.ms_per_image["slow"] > measured.ms_per_image["fast"] > 0
    assert measured.batch == 4 and "fast" in measured.reason("fp32") and measured.seconds < 10


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_auto_serves_the_runtime_measured_faster_on_this_cpu(both_runtimes, precision):
    loaded = load_predictor(both_runtimes, CPU, precision, "auto", trial_batch=4)
    measured = _assert_measured(loaded.members[0], precision)
    assert loaded.backends == (measured["backend"],) and measured["batch"] == 4
    files = {name: one["file"] for name, one in measured["candidates"].items()}
    torch_file = "both.pt:torch/int8" if precision == "int8" else "both.pt"
    assert files == {"onnxruntime": f"both.pt:onnxruntime/{precision}", "torch": torch_file}
    served = loaded.predictor.members[0].model
    assert isinstance(served, OnnxNetwork) == (measured["backend"] == "onnxruntime")
    # A measurement made before (gunicorn's master) decides without timing anything again.
    decided = {load_bundle(both_runtimes).content_hash: {"backend": "torch", "reason": "measured", "measured": None}}
    assert load_predictor(both_runtimes, CPU, precision, "auto", chosen=decided).backends == ("torch",)
    unmeasured = load_predictor(both_runtimes, CPU, precision, "auto", chosen={}).members[0]
    assert unmeasured["backend"] == "onnxruntime" and "not measured" in unmeasured["reason"]


def test_one_candidate_is_not_measured(exported, both_runtimes, bundle_copy, tmp_path):
    only_graph = load_predictor(exported[0], CPU, "int8", "auto").members[0]  # it carries no PyTorch int8 network
    assert only_graph["backend"] == "onnxruntime" and only_graph["measured"] is None
    assert "PyTorch's int8 is no candidate: bundle.pt carries no int8 network" in only_graph["reason"]
    no_graph = load_predictor(bundle_copy, CPU, "fp32", "auto").members[0]
    assert no_graph["backend"] == "torch" and no_graph["measured"] is None
    asked = load_predictor(both_runtimes, CPU, "int8", "torch").members[0]
    assert asked["backend"] == "torch" and asked["measured"] is None
    settings = load_settings({}, {"MODEL_PATH": str(bundle_copy), "DEVICE": "cpu"}, machine=False)
    assert not measures_backends(settings)  # so gunicorn's master starts no trial either
    # An unusable PyTorch int8 entry is no candidate: ONNX Runtime serves, and the reason names it and its fix.
    stale = Path(shutil.copy(exported[0], tmp_path / "stale.pt"))
    add_runtimes(stale, load_bundle(stale).content_hash, {ENTRY: {"format": {"name": "something-else"}}})
    member = load_predictor(stale, CPU, "int8", "auto").members[0]
    assert member["backend"] == "onnxruntime" and member["measured"] is None
    assert "stale.pt:torch/int8 is not an int8 network of this version" in member["reason"]
    assert "python scripts/quantize.py" in member["reason"]


def test_gunicorn_measures_once_before_forking_and_every_worker_serves_the_choice(both_runtimes, tmp_path):
    photo = (REPO_ROOT / "tests" / "data" / "chelsea.jpg").read_bytes()
    server = start_server(both_runtimes, tmp_path, workers=2, DEVICE="cpu", PRECISION="int8", MAX_BATCH_SIZE=4)
    try:
        poll_readyz(server, workers=2)
        (member,) = requests.get(f"{server.url}/model", timeout=30).json()["members"]
        response = requests.post(f"{server.url}/predict", data=photo, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200 and response.json()["predicted_class"]
    finally:
        server.stop()
    measured = _assert_measured(member, "int8")
    assert measured["batch"] == 4 and measured["threads"] == 1
    files = {one["file"] for one in measured["candidates"].values()}
    assert files == {"both.pt:torch/int8", "both.pt:onnxruntime/int8"}
    # Both workers log the same figures: the master's one trial, not one per worker.
    lines = [line for line in server.log().splitlines() if f"by {member['backend']} int8 (int8: " in line]
    assert len(lines) == 2 and len({line.split("BACKEND=auto: ")[1] for line in lines}) == 1


def test_an_app_without_gunicorns_master_measures_in_a_child(both_runtimes, app_factory):
    app = app_factory(both_runtimes, PRECISION="int8", DEVICE="cpu", MAX_BATCH_SIZE=2)
    (member,) = app.test_client().get("/model").get_json()["members"]
    assert _assert_measured(member, "int8")["batch"] == 2
    served = get_service(app).handler.predictor.members[0].model
    assert isinstance(served, OnnxNetwork) == (member["backend"] == "onnxruntime")


# The hot-swap docs/operations.md documents, on bundles as training writes them (graphs inside): under load, every
# answer 200, every worker on the new version, served by the runtime that served before; then the model watch
# (MODEL_WATCH_S, what compose and Kubernetes set) swaps back with no HUP at all.


@pytest.fixture(scope="module")
def retrained(training_data, tmp_path_factory) -> Path:
    """Another training run's bundle (another seed), with its graphs: the 'new model' of a hot-swap."""
    output = tmp_path_factory.mktemp("retrained") / "new.pt"
    run_train(training_data, output, **{**FIXTURE, "epochs": 1}, seed=1, graphs="fp32,int8")
    return output


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_hot_swap_of_one_file_serves_the_new_version_on_the_same_runtime(exported, retrained, precision, tmp_path):
    photo = (REPO_ROOT / "tests" / "data" / "chelsea.jpg").read_bytes()
    model_path = tmp_path / "current.pt"
    soak.replace_atomically(exported[0], model_path)
    old, new = load_bundle(exported[0]).version, load_bundle(retrained).version
    server = start_server(model_path, tmp_path, workers=2, DEVICE="cpu", PRECISION=precision, MODEL_WATCH_S="0.5",
                          GRACEFUL_TIMEOUT=10)  # fmt: skip
    try:
        poll_readyz(server, workers=2)
        before = requests.get(f"{server.url}/model", timeout=30).json()["members"][0]["backend"]
        with soak.Load(server.url, photo, clients=4) as load:
            load.wait_answers(4)
            swap = soak.hot_swap(server.url, server.process.pid, load, 2, retrained, model_path)
            after = requests.get(f"{server.url}/model", timeout=30).json()["members"][0]
            # Back to the first bundle by replacing the file alone: the master's watch reloads.
            start = time.monotonic()
            soak.replace_atomically(exported[0], model_path)
            soak.wait_for(lambda: soak.live_versions(server.url) == {old: 2.0}, 120, "the watch's reload")
            load.wait_answers(4, since=time.monotonic())
            back = soak.summarize(load.since(start))
    finally:
        server.stop()
    assert swap["non_2xx"] == back["non_2xx"] == 0 and swap["requests"] and back["requests"], (swap, back)
    assert swap["served_version"] == new and set(swap["versions_live"]) == {new}
    assert after["backend"] == before and after["precision"] == precision
    if before == "onnxruntime":
        assert after["graph"] == f"current.pt:onnxruntime/{precision}"
    assert "model watch: " in server.log() and "replaced; reloading (SIGHUP)" in server.log()


def test_the_model_watch_reloads_once_a_change_holds_still(tmp_path):
    path, reasons = tmp_path / "m.pt", []
    path.write_bytes(b"one")
    watch = ModelWatch([str(path)], 60, reasons.append)
    seen = watch.poll(watch.poll(signature([str(path)])))
    assert reasons == []  # nothing changed
    path.write_bytes(b"two, longer")
    seen = watch.poll(seen)
    assert reasons == []  # changed since the last look: it may still be being written
    watch.poll(seen)
    assert reasons == [f"{path} replaced"]
    path.unlink()
    watch.poll(watch.poll(seen))
    assert len(reasons) == 1  # no file: nothing to load, nothing reloaded
