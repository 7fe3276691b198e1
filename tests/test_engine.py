"""The shared loops: evaluation counts every image once, training updates only trainable parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.pet_classifier import PetClassifier
from models.runtime import Runtime, resolve_amp
from models.training.data import ImageList, discover, make_loader
from models.training.engine import evaluate, make_scaler, train_one_epoch
from models.training.strategies import LRSchedule, build_optimizer, set_trainable
from models.transforms import default_preprocess, eval_transform

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def loaders(demo_data):
    """Unshuffled 32-pixel train and val loaders over the conftest demo data."""
    split = discover(demo_data)
    transform = eval_transform(default_preprocess(32))
    return [make_loader(ImageList(s, transform), 8, 0) for s in (split.train, split.val)]


def test_evaluate_counts_every_image_once(loaders):
    torch.manual_seed(0)
    model = PetClassifier(3, arch="resnet18", head={"hidden": 0})
    result = evaluate(model, loaders[1], nn.CrossEntropyLoss(), CPU, num_classes=3)
    confusion = torch.tensor(result["confusion"])
    assert confusion.sum().item() == 12 and confusion.sum(dim=1).tolist() == [4, 4, 4]
    assert result["acc"] == pytest.approx(confusion.diag().sum().item() / 12)
    assert result == evaluate(model, loaders[1], nn.CrossEntropyLoss(), CPU, num_classes=3)  # deterministic


def test_train_one_epoch_moves_only_trainable_parameters(loaders):
    torch.manual_seed(0)
    model = PetClassifier(3, arch="resnet18", head={"hidden": 0})
    set_trainable(model, ["head"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, "adamw", 1e-3, {}, 0.0)
    schedule = LRSchedule("none", epochs=1, steps_per_epoch=len(loaders[0]))
    stats = train_one_epoch(model, loaders[0], nn.CrossEntropyLoss(), optimizer, make_scaler(CPU), CPU, schedule, 0)
    assert stats["images"] == 36 and stats["images_per_s"] > 0 and 0 <= stats["acc"] <= 1
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("head.") for name in changed)


def test_amp_resolution():
    assert resolve_amp("auto", torch.device("cpu")) == "none"
    assert resolve_amp("fp16", torch.device("cpu")) == "fp16"
    assert not make_scaler(CPU).is_enabled()
