"""The trainer end to end on the CPU (learning, bundle, reports, resume, hygiene, options) and its CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.bundle import load_model
from models.images import load_image
from models.training.calibration import nll
from models.training.config import SettingError, TrainConfig, flag_message
from models.training.data import DataError
from models.training.demo_data import noise_image
from models.training.evaluation import evaluate_bundle
from models.training.reporting import sibling
from models.transforms import eval_transform
from tests.fixtures.training import FIXTURE, run_train, train_config
from tests.helpers import REPO_ROOT, tensorboard_scalars
from tests.numerics import beats_chance, most_flagged

TRAIN_SCRIPT = str(REPO_ROOT / "scripts" / "train.py")

pytestmark = [pytest.mark.slow, pytest.mark.numerics]


def test_three_epochs_beat_chance_clearly(trained_run):
    assert len(trained_run["history"]) == 3
    assert beats_chance(round(trained_run["best_val_acc"] * 60), 60, classes=3), trained_run["best_val_acc"]


def validation_logits(model, preprocess, data_dir: Path, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every validation image of `data_dir`, decoded and transformed as training does."""
    paths = sorted((data_dir / "val").rglob("*.jpg"))
    transform = eval_transform(preprocess)
    images = torch.stack([transform(load_image(path, min_size=preprocess["resize"])) for path in paths])
    with torch.inference_mode():
        logits = model(images)
    return logits, torch.tensor([class_names.index(path.parent.name) for path in paths])


def test_bundle_loads_and_predicts(trained_bundle_path, training_data, class_names):
    model, bundle = load_model(trained_bundle_path)
    assert bundle.class_names == class_names
    assert set(bundle.metrics) >= {"best_val_acc", "val_loss", "per_class_acc", "epoch", "train_images_per_s"}
    assert set(bundle.metrics["per_class_acc"]) == set(class_names)
    assert bundle.training["arch"] == "resnet18" and bundle.training["epochs"] == 3
    assert bundle.training["class_counts"]["train"] == dict.fromkeys(class_names, 80)
    # Fitted after the epoch loop on the 60 validation images: a temperature and an energy detector.
    assert bundle.calibration["images"] == 60 and bundle.temperature > 0
    assert bundle.metrics["ece_after"] == bundle.calibration["ece_after"]
    assert bundle.ood["score"] == "energy" and bundle.ood["keep"] == 0.95
    # What temperature scaling promises: T minimises the validation NLL, so NLL after <= before (T = 1), and T is a
    # minimum along T. It promises nothing about a 15-bin ECE on 60 images, which rose under AVX-512 kernels.
    calibration = bundle.calibration
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9, calibration
    logits, labels = validation_logits(model, bundle.preprocess, training_data, class_names)
    assert nll(logits, labels) == pytest.approx(calibration["nll_before"], rel=1e-4)  # the same images, same run
    fitted = nll(logits, labels, bundle.temperature)
    assert fitted <= min(nll(logits, labels, bundle.temperature * f) for f in (0.9, 1.1)) + 1e-9
    image = load_image(next((training_data / "val" / "circle").iterdir()))
    with torch.inference_mode():
        probs = model(eval_transform(bundle.preprocess)(image).unsqueeze(0)).softmax(dim=1)
    assert probs.shape == (1, 3) and probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_the_service_reproduces_the_validation_accuracy(app_factory, trained_run, training_data):
    client = app_factory(trained_run["output"]).test_client()
    images = sorted((training_data / "val").rglob("*.jpg"))
    correct = unknown = 0
    for path in images:
        answer = client.post("/predict", data=path.read_bytes(), content_type="image/jpeg")
        assert answer.status_code == 200, answer.json
        correct += answer.json["predicted_class"] == path.parent.name
        unknown += answer.json["unknown"]
    # The served path folds BatchNorm and runs on one thread: the same answers, up to an image on an exact tie.
    assert correct / len(images) == pytest.approx(trained_run["best_val_acc"], abs=1 / len(images))
    assert unknown <= most_flagged(len(images), keep=0.95), "the threshold keeps 95% of the validation images known"
    # Whether noise looks unknown to this 3-epoch model trained without outliers is luck, not a property: measured
    # 0 to 60% of noise images flagged depending only on the thread count (float summation order) of training.
    # What makes it a property is outlier exposure: test_outlier_exposure_teaches_the_service_to_flag_negatives.


def noise_png(seed: int) -> bytes:
    """A random-noise image (demo_data.noise_image) encoded as PNG."""
    encoded = io.BytesIO()
    noise_image(seed).save(encoded, format="PNG")
    return encoded.getvalue()


def test_outlier_exposure_teaches_the_service_to_flag_negatives(tmp_path, training_data, app_factory):
    # A user's own negatives (here noise images 1000-1059) trained towards "none of the classes": held-out images
    # of that kind (seeds 0-39, never trained on) come back unknown, the validation images stay known.
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for seed in range(1000, 1060):
        noise_image(seed).save(negatives / f"{seed}.png")
    output = tmp_path / "exposed.pt"
    summary = run_train(training_data, output, **FIXTURE, outlier_exposure=0.5, outliers=str(negatives))
    assert all(row["outlier_loss"] > 0 for row in summary["history"])
    assert tensorboard_scalars(sibling(output, ".tb"), "loss/outlier") == [
        pytest.approx(row["outlier_loss"], rel=1e-6) for row in summary["history"]
    ]
    assert beats_chance(round(summary["best_val_acc"] * 60), 60, classes=3), summary["best_val_acc"]
    client = app_factory(output).test_client()
    assert client.get("/model").json["ood"]["score"] == "max-probability"  # `auto` after outlier exposure
    images = sorted((training_data / "val").rglob("*.jpg"))
    known = [client.post("/predict", data=path.read_bytes(), content_type="image/jpeg").json for path in images]
    assert sum(answer["unknown"] for answer in known) <= most_flagged(len(images), keep=0.95)
    noise = [client.post("/predict", data=noise_png(seed), content_type="image/png").json for seed in range(40)]
    assert sum(answer["unknown"] for answer in noise) / len(noise) >= 0.9, [a["ood_score"] for a in noise]


def test_history_curves_and_checkpoint_are_written(trained_bundle_path):
    history = json.loads(sibling(trained_bundle_path, ".history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == [0, 1, 2]
    assert {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "time_s"} <= set(
        history["epochs"][0]
    )
    assert sibling(trained_bundle_path, ".history.csv").read_text().count("\n") == 4
    assert sibling(trained_bundle_path, ".curves.png").read_bytes().startswith(b"\x89PNG")
    ckpt = torch.load(sibling(trained_bundle_path, ".ckpt"), map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and {"model", "optimizer", "schedule", "scaler", "history"} <= set(ckpt)


def test_resume_continues_from_the_saved_epoch(tmp_path, demo_data, capsys):
    output = tmp_path / "model.pt"
    run_train(demo_data, output, epochs=1)
    summary = run_train(demo_data, output, epochs=2, resume=str(sibling(output, ".ckpt")))
    assert "resumed from" in capsys.readouterr().out
    assert [row["epoch"] for row in summary["history"]] == [0, 1]
    ckpt = torch.load(sibling(output, ".ckpt"), map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1


def test_overlap_refused_allowed_and_unreadable_skipped(tmp_path, demo_data):
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    shutil.copy(data / "train" / "square" / "square_0001.jpg", data / "val" / "square" / "copy.jpg")
    (data / "train" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    output = tmp_path / "model.pt"
    with pytest.raises(DataError, match="square_0001.jpg"):
        run_train(data, output)
    assert not output.exists()
    run_train(data, output, allow_overlap=True)
    skipped = json.loads(sibling(output, ".history.json").read_text())["skipped_images"]
    assert [Path(item["path"]).name for item in skipped] == ["broken.jpg"]
    assert load_model(output)[1].training["skipped_images"] == skipped


def test_other_options_run(tmp_path, demo_data):
    options = {"opt": "sgd", "lr_scheduler": "step", "mixup_alpha": 0.2, "cutmix_alpha": 1.0}
    options |= {"class_weights": "balanced", "balanced_sampler": True, "strategy": "feature-extraction"}
    summary = run_train(demo_data, tmp_path / "model.pt", **options, amp="bf16", label_smoothing=0.1)
    assert summary["history"][0]["trainable"] == ["head"]
    assert 0.0 <= summary["best_val_acc"] <= 1.0


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """scripts/train.py in a fresh interpreter, as a user runs it."""
    command = [sys.executable, TRAIN_SCRIPT, *argv]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_demo_preset_yields_to_explicit_flags():
    assert TrainConfig.demo(epochs=3).arch == "resnet18"
    demo = json.loads(run_script("--demo", "--data-dir", "d", "--epochs", "3", "--print-config").stdout)
    assert (demo["arch"], demo["image_size"], demo["weights"], demo["epochs"]) == ("resnet18", 64, "auto", 3)
    # The demo trains its unknown flag with outlier exposure on generated outliers, read by the max probability.
    assert (demo["outlier_exposure"], demo["outliers"]) == (1.0, "synthetic")
    assert TrainConfig.demo().resolved_ood_score == "max-probability"
    assert TrainConfig.demo(outlier_exposure=0.0).resolved_ood_score == "energy"
    plain = json.loads(run_script("--data-dir", "d", "--print-config").stdout)
    assert plain == {**TrainConfig().to_dict(), "data_dir": "d"}
    assert "(default: resnet50)" in run_script("--help").stdout


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"val_split": 0.0}, "`val_split`=0.0 is invalid: must be a number in (0.0, 1.0)"),
        ({"unfreeze_every": 0}, "`unfreeze_every`=0 is invalid: must be an integer >= 1"),
        ({"amp": "fp8"}, "`amp`='fp8' is invalid: valid choices are auto, bf16, fp16, none"),
    ],
)
def test_library_errors_name_the_setting_and_the_cli_names_the_flag(tmp_path, settings, message):
    with pytest.raises(SettingError) as info:
        train_config(tmp_path, tmp_path / "m.pt", **settings)
    assert message in str(info.value)
    assert flag_message(message).startswith("--" + next(iter(settings)).replace("_", "-"))


def test_cli_errors_name_flags_without_a_traceback(tmp_path, demo_data):
    result = run_script("--data-dir", str(demo_data), "--val-split", "1.5")
    assert result.returncode != 0
    assert "error: --val-split=1.5 is invalid: must be a number in (0.0, 1.0)" in result.stderr
    assert "Traceback" not in result.stderr
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    shutil.copy(data / "train" / "square" / "square_0001.jpg", data / "val" / "square" / "copy.jpg")
    result = run_script("--data-dir", str(data), "--output", str(tmp_path / "m.pt"), "--weights", "none")
    assert result.returncode != 0 and "pass --allow-overlap" not in result.stderr
    assert "or set --allow-overlap to train anyway" in result.stderr and "Traceback" not in result.stderr


def test_torchrun_two_processes_write_one_bundle(tmp_path, demo_data):
    out_dir = tmp_path / "out"
    # Gradual unfreezing also exercises re-wrapping DDP when the trainable set grows.
    config = train_config(demo_data, out_dir / "model.pt", epochs=2, strategy="gradual-unfreeze", unfreeze_every=1)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items() if v not in (None, False)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, TRAIN_SCRIPT, *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "model.ckpt",
        "model.curves.png",
        "model.history.csv",
        "model.history.json",
        "model.pt",
        "model.tb",
    ]
    assert result.stdout.count("epoch   1 |") == 1  # only rank 0 logs
    assert len(list((out_dir / "model.tb").glob("events.out.tfevents.*"))) == 1  # and writes TensorBoard events
    bundle = load_model(out_dir / "model.pt")[1]
    assert bundle.training["world_size"] == 2
    assert bundle.calibration["images"] == 12 and bundle.ood is not None  # rank 0 saw every validation image
    # Validation was sharded over two processes and all-reduced: one process over all images agrees.
    report = evaluate_bundle(out_dir / "model.pt", demo_data, tmp_path / "eval", workers=0)
    assert report["accuracy"] == pytest.approx(bundle.metrics["val_acc"])
    assert report["loss"] == pytest.approx(bundle.metrics["val_loss"], rel=1e-4)
