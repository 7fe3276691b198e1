"""ONNX Runtime on the CPU: export of every architecture family, the graphs beside a bundle, the one loader's
choice of runtime, serving through it, and start-up refusing bad graphs before any worker forks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from app import get_service
from app.config import load_settings, measures_backends
from models.bundle import load_bundle, load_model, save_bundle
from models.choice import faster, trial_images
from models.graphs import GraphError, bundle_header, check_graph, graph_path, graph_problem
from models.loader import choose_backend, load_predictor
from models.onnx_runtime import OnnxNetwork
from models.pet_classifier import PetClassifier
from models.quantize import int8_path, quantize, save_int8
from models.training.agreement import batches
from models.training.data import discover
from models.training.export import export_bundle, export_fp32
from models.transforms import default_preprocess
from tests.helpers import REPO_ROOT, poll_readyz, start_server

CPU = torch.device("cpu")


@pytest.mark.numerics  # ONNX Runtime's kernels differ by CPU too: .ci/run repeats these on AVX2
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_every_architecture_family_exports_and_matches_pytorch(arch, tmp_path):
    torch.manual_seed(0)
    model = PetClassifier(3, arch=arch, head={"hidden": 16}).eval()
    network = OnnxNetwork(export_fp32(model, 32, tmp_path / "graph.onnx"), "fp32")
    images = torch.randn(5, 3, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    logits, features = network(images)
    with torch.inference_mode():
        expected_features = model.backbone(images)
        expected = model.head(expected_features)
    assert logits.shape == (5, 3) and features.shape == expected_features.shape
    torch.testing.assert_close(torch.softmax(logits, 1), torch.softmax(expected, 1), atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


@pytest.fixture(scope="module")
def exported(trained_bundle_path, training_data, tmp_path_factory) -> tuple[Path, dict]:
    """A trained bundle with its fp32 and int8 graphs, as scripts/export.py leaves them."""
    bundle = Path(shutil.copy(trained_bundle_path, tmp_path_factory.mktemp("graphs") / "bundle.pt"))
    report = export_bundle(bundle, training_data, calibration_images=48, holdout_images=40, workers=0)
    return bundle, report


@pytest.mark.numerics
def test_export_writes_both_graphs_tied_to_the_bundle_with_their_agreement(exported):
    bundle, report = exported
    header = bundle_header(bundle)
    assert header["content_hash"] == load_bundle(bundle).content_hash  # read without unpickling tensors
    for precision in ("fp32", "int8"):
        assert report["graphs"][precision]["path"] == str(graph_path(bundle, precision))
        info = check_graph(graph_path(bundle, precision), header, precision, bundle)
        measured = info["agreement"][precision]
        assert measured == report["graphs"][precision]["agreement"][precision] and measured["images"] == 40
    fp32 = report["graphs"]["fp32"]["agreement"]["fp32"]
    assert fp32["agreement"] == 1.0 and fp32["max_probability_difference"] <= 1e-4
    assert report["graphs"]["int8"]["calibration"]["images"] == 48
    assert report["graphs"]["int8"]["agreement"]["int8"]["agreement"] >= 0.9  # 40 images: int8 may flip near-ties


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
    assert int8.members[0]["graph"] == str(graph_path(bundle, "int8")) and int8.members[0]["agreement"]["images"] == 40
    assert int8.predictor(images).probs.shape == expected.probs.shape


def test_backend_choice_says_why(bundle_copy):
    runtime, why = choose_backend(str(bundle_copy), CPU, "fp32", "auto")
    assert runtime == "torch" and "no fp32 graph at" in why and "python scripts/export.py" in why
    with pytest.raises(GraphError, match="no int8 graph at .*make it with: python scripts/export.py"):
        choose_backend(str(bundle_copy), CPU, "int8", "onnxruntime")
    assert choose_backend(str(bundle_copy), torch.device("cuda"), "fp32", "auto")[0] == "torch"
    assert choose_backend(str(bundle_copy), CPU, "bf16", "auto")[0] == "torch"
    with pytest.raises(GraphError, match="CPU only"):
        choose_backend(str(bundle_copy), torch.device("cuda"), "fp32", "onnxruntime")


def _other_bundle(path: Path, classes: int = 3, crop: int = 64) -> Path:
    torch.manual_seed(1)
    model = PetClassifier(classes, arch="resnet18", head={"hidden": 0}).eval()
    save_bundle(path, model, [f"c{i}" for i in range(classes)], default_preprocess(crop))
    return path


@pytest.fixture(scope="module")
def bad_graphs(exported, tmp_path_factory) -> dict[str, Path]:
    """Bundles whose fp32 graph is stale, truncated, not ONNX at all, or shaped for other inputs/outputs."""
    bundle, _ = exported
    folder = tmp_path_factory.mktemp("bad")
    graph = graph_path(bundle, "fp32").read_bytes()
    cases = {}
    for name in ("stale", "truncated", "garbage", "mismatched"):
        cases[name] = Path(shutil.copy(bundle, folder / f"{name}.pt"))
    cases["stale"] = _other_bundle(cases["stale"])
    graph_path(cases["stale"], "fp32").write_bytes(graph)  # made from another bundle
    graph_path(cases["truncated"], "fp32").write_bytes(graph[: len(graph) // 2])
    graph_path(cases["garbage"], "fp32").write_bytes(b"not an onnx graph" * 100)
    mismatched = _other_bundle(folder / "mismatched-source.pt", classes=5, crop=32)
    export_bundle(mismatched, precisions=("fp32",))
    cases["mismatched"] = _other_bundle(cases["mismatched"], classes=3, crop=64)
    # The 5-class, 32-pixel graph retagged with this bundle's hash: only its inputs and outputs are wrong.
    import onnx

    from models.graphs import META_HASH

    model = onnx.load(str(graph_path(mismatched, "fp32")))
    for entry in model.metadata_props:
        if entry.key == META_HASH:
            entry.value = load_bundle(cases["mismatched"]).content_hash
    onnx.save(model, str(graph_path(cases["mismatched"], "fp32")))
    return cases


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("stale", "was made from another bundle"),
        ("truncated", "is not a readable ONNX graph"),
        ("garbage", "is not a readable ONNX graph"),
        ("mismatched", "takes tensor(float)"),
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
    assert str(graph_path(bundle, "fp32")) in result.stderr and "python scripts/export.py" in result.stderr
    assert "Traceback" not in result.stderr


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
            assert "no fp32 graph at" in server.log() and "python scripts/export.py" in server.log()
        else:
            assert member["graph"] == graph_path(bundle, "fp32").name and member["agreement"]["agreement"] == 1.0


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
    """The exported bundle with its graphs and a PyTorch int8 file too: two candidates for fp32 and for int8."""
    source, _ = exported
    bundle = Path(shutil.copy(source, tmp_path_factory.mktemp("both") / "both.pt"))
    for precision in ("fp32", "int8"):
        shutil.copy(graph_path(source, precision), graph_path(bundle, precision))
    model, loaded = load_model(bundle)
    crop = loaded.preprocess["crop"]
    quantized = quantize(model, [trial_images(8, crop)], crop)  # timing only: calibrated on noise
    save_int8(int8_path(bundle), quantized, loaded, {"calibration": {"images": 8, "data": "noise, for timing"}})
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
    torch_file = int8_path(both_runtimes).name if precision == "int8" else both_runtimes.name
    assert files == {"onnxruntime": graph_path(both_runtimes, precision).name, "torch": torch_file}
    served = loaded.predictor.members[0].model
    assert isinstance(served, OnnxNetwork) == (measured["backend"] == "onnxruntime")
    # A measurement made before (gunicorn's master) decides without timing anything again.
    decided = {load_bundle(both_runtimes).content_hash: {"backend": "torch", "reason": "measured", "measured": None}}
    assert load_predictor(both_runtimes, CPU, precision, "auto", chosen=decided).backends == ("torch",)
    unmeasured = load_predictor(both_runtimes, CPU, precision, "auto", chosen={}).members[0]
    assert unmeasured["backend"] == "onnxruntime" and "not measured" in unmeasured["reason"]


def test_one_candidate_is_not_measured(exported, both_runtimes, bundle_copy, tmp_path):
    only_graph = load_predictor(exported[0], CPU, "int8", "auto").members[0]  # no PyTorch int8 file beside it
    assert only_graph["backend"] == "onnxruntime" and only_graph["measured"] is None
    assert "PyTorch's int8 is no candidate: no int8 network at" in only_graph["reason"]
    no_graph = load_predictor(bundle_copy, CPU, "fp32", "auto").members[0]
    assert no_graph["backend"] == "torch" and no_graph["measured"] is None
    asked = load_predictor(both_runtimes, CPU, "int8", "torch").members[0]
    assert asked["backend"] == "torch" and asked["measured"] is None
    settings = load_settings({}, {"MODEL_PATH": str(bundle_copy), "DEVICE": "cpu"}, machine=False)
    assert not measures_backends(settings)  # so gunicorn's master starts no trial either
    # A stale PyTorch int8 file is no candidate: ONNX Runtime serves, and the reason names the file and its fix.
    stale = Path(shutil.copy(exported[0], tmp_path / "stale.pt"))
    shutil.copy(graph_path(exported[0], "int8"), graph_path(stale, "int8"))
    torch.save({"format": {"name": "something-else"}}, int8_path(stale))
    member = load_predictor(stale, CPU, "int8", "auto").members[0]
    assert member["backend"] == "onnxruntime" and member["measured"] is None
    assert "is not an int8 network file" in member["reason"] and "python scripts/quantize.py" in member["reason"]


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
    assert {one["file"] for one in measured["candidates"].values()} == {"both.int8.pt", "both.int8.onnx"}
    # Both workers log the same figures: the master's one trial, not one per worker.
    lines = [line for line in server.log().splitlines() if f"by {member['backend']} int8 (int8: " in line]
    assert len(lines) == 2 and len({line.split("BACKEND=auto: ")[1] for line in lines}) == 1


def test_an_app_without_gunicorns_master_measures_in_a_child(both_runtimes, app_factory):
    app = app_factory(both_runtimes, PRECISION="int8", DEVICE="cpu", MAX_BATCH_SIZE=2)
    (member,) = app.test_client().get("/model").get_json()["members"]
    assert _assert_measured(member, "int8")["batch"] == 2
    served = get_service(app).handler.predictor.members[0].model
    assert isinstance(served, OnnxNetwork) == (member["backend"] == "onnxruntime")
