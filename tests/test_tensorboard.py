"""TensorBoard events written by training, read back with TensorBoard's own reader (the shared training run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tensorboard.plugins.hparams import plugin_data_pb2

from models.bundle import load_bundle
from models.training.config import TrainConfig
from models.training.reporting import sibling
from models.training.tensorboard_log import (
    CONFUSION_TAG,
    LR_TAG,
    METRIC_PREFIX,
    RELIABILITY_TAG,
    SCALARS,
    TrainingBoard,
)
from tests.helpers import REPO_ROOT, tensorboard_events

TRAIN_SCRIPT = str(REPO_ROOT / "scripts" / "train.py")


@pytest.fixture(scope="module")
def events(trained_run) -> object:
    return tensorboard_events(sibling(trained_run["output"], ".tb"))


@pytest.fixture(scope="module")
def history(trained_run) -> list[dict]:
    return json.loads(sibling(trained_run["output"], ".history.json").read_text())["epochs"]


pytestmark = pytest.mark.slow  # the shared training run


def test_every_epoch_scalar_matches_the_history_file(events, history):
    tags = set(events.Tags()["scalars"])
    for key, tag in SCALARS.items():
        if key not in history[0]:
            assert tag not in tags  # the outlier loss only with outlier exposure (test_train checks it there)
            continue
        logged = sorted(events.Scalars(tag), key=lambda e: e.step)
        assert [e.step for e in logged] == [row["epoch"] for row in history], tag
        assert [e.value for e in logged] == [pytest.approx(row[key], rel=1e-6) for row in history], tag  # float32


def test_every_parameter_groups_learning_rate_is_logged(events, history):
    groups = history[-1]["trainable"]
    lr_tags = {tag for tag in events.Tags()["scalars"] if tag.startswith(LR_TAG.format(""))}
    assert lr_tags == {LR_TAG.format(name) for name in groups}
    # The history's lr is the first group's; the cosine schedule moves it every epoch.
    first = [sorted(events.Scalars(tag), key=lambda e: e.step) for tag in sorted(lr_tags)]
    matching = [s for s in first if [e.value for e in s] == [pytest.approx(r["lr"], rel=1e-6) for r in history]]
    assert matching, "no learning-rate series equals the history's lr"


def test_confusion_matrix_and_reliability_diagram_are_images(events, trained_run):
    best_epoch = load_bundle(trained_run["output"]).metrics["epoch"]
    (confusion,) = events.Images(CONFUSION_TAG)
    assert confusion.step == best_epoch and confusion.encoded_image_string.startswith(b"\x89PNG")
    (reliability,) = events.Images(RELIABILITY_TAG)
    assert reliability.encoded_image_string.startswith(b"\x89PNG") and reliability.width > 100


def test_hparams_hold_the_settings_and_the_final_metrics(events, trained_run):
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["arch"].string_value == "resnet18"
    assert start.hparams["epochs"].number_value == 3
    assert start.hparams["weights_used"].string_value == "none"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    shown = {info.name.tag for info in experiment.metric_infos}
    metrics = load_bundle(trained_run["output"]).metrics
    assert {f"{METRIC_PREFIX}{name}" for name in ("best_val_acc", "val_loss", "macro_f1", "ece_after")} <= shown
    (best,) = events.Scalars(f"{METRIC_PREFIX}best_val_acc")
    assert best.value == pytest.approx(metrics["best_val_acc"]) == pytest.approx(trained_run["best_val_acc"])
    (ece,) = events.Scalars(f"{METRIC_PREFIX}ece_after")
    assert ece.value == pytest.approx(metrics["ece_after"], rel=1e-6)


def test_events_go_next_to_the_bundle_or_to_log_dir(tmp_path):
    assert TrainConfig(output="models/pet_classifier.pt").tensorboard_dir == "models/pet_classifier.tb"
    flags = ["--output", "out/m.pt", "--log-dir", str(tmp_path / "runs" / "a"), "--print-config"]
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert TrainConfig(**json.loads(result.stdout)).tensorboard_dir == str(tmp_path / "runs" / "a")


def test_only_the_main_process_writes_and_training_goes_on_without_tensorboard(tmp_path, monkeypatch):
    said: list[str] = []
    assert TrainingBoard.open(tmp_path / "rank1", False, 0, said.append).writer is None
    assert not (tmp_path / "rank1").exists() and not said
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as in the image: no tensorboard package
    board = TrainingBoard.open(tmp_path / "missing", True, 0, said.append)
    assert board.writer is None and not (tmp_path / "missing").exists()
    assert said == ["TensorBoard: not installed, no events written (pip install tensorboard (requirements-dev.txt))"]
    board.epoch({"epoch": 0, "train_loss": 1.0}, optimizer=None)  # every call a no-op, nothing raised
    board.finish(0, {}, {}, None)
    board.close()
