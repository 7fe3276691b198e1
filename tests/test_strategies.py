"""Strategies: trainable layer groups per epoch, per-group learning rates, optimizer rebuilds, schedules."""

from __future__ import annotations

import json

import pytest
import torch

from models.pet_classifier import PetClassifier
from models.training.reporting import sibling
from models.training.strategies import (
    LRSchedule,
    build_optimizer,
    carry_state,
    group_names,
    layer_groups,
    param_groups,
    parse_lr_mults,
    set_trainable,
    train_mode,
    trainable_at,
)
from tests.fixtures.training import run_train

GROUPS = ("head", "layer4", "layer3", "rest")


@pytest.fixture(scope="module")
def model() -> PetClassifier:
    """A small real network whose groups the tests freeze and unfreeze."""
    torch.manual_seed(0)
    return PetClassifier(3, arch="resnet18", weights="none", head={"hidden": 0})


def trainable_by_group(model: PetClassifier) -> dict[str, bool]:
    """Per group: True when all its parameters train, False when none do (mixed fails the test)."""
    result = {}
    for name, params in layer_groups(model).items():
        flags = {p.requires_grad for p in params}
        assert len(flags) == 1, f"group {name} is partly frozen"
        result[name] = flags.pop()
    return result


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("feature-extraction", [["head"], ["head"], ["head"], ["head"], ["head"]]),
        ("fine-tune", [list(GROUPS)] * 5),
        (
            "gradual-unfreeze",
            [["head"], ["head"], ["head", "layer4"], ["head", "layer4"], ["head", "layer4", "layer3"]],
        ),
    ],
)
def test_each_stage_trains_exactly_its_groups(model, strategy, expected):
    for epoch, groups in enumerate(expected):
        assert trainable_at(strategy, GROUPS, epoch, unfreeze_every=2) == groups
        set_trainable(model, groups)
        assert trainable_by_group(model) == {name: name in groups for name in GROUPS}


def test_gradual_unfreeze_reaches_every_group():
    assert trainable_at("gradual-unfreeze", GROUPS, 10, unfreeze_every=1) == list(GROUPS)


def test_lr_mults_auto_and_explicit(model):
    assert parse_lr_mults("auto", model, pretrained=False) == dict.fromkeys(GROUPS, 1.0)
    assert parse_lr_mults("auto", model, pretrained=True) == {"head": 1.0, "layer4": 0.1, "layer3": 0.05, "rest": 0.01}
    assert parse_lr_mults("layer4=0.5", model, pretrained=True)["layer4"] == 0.5
    with pytest.raises(ValueError, match="layer9"):
        parse_lr_mults("layer9=1", model, pretrained=True)


def test_optimizer_groups_follow_the_stage_and_keep_moments(model):
    mults = {"head": 1.0, "layer4": 0.1, "layer3": 0.05, "rest": 0.01}
    set_trainable(model, ["head"])
    first = build_optimizer(model, "adamw", 1e-3, mults, 0.01)
    head_param = first.param_groups[0]["params"][0]
    head_param.grad = torch.ones_like(head_param)
    first.step()
    set_trainable(model, ["head", "layer4"])
    second = build_optimizer(model, "sgd", 1e-3, mults, 0.01)
    carry_state(first, second)
    assert {g["name"]: g["lr"] for g in second.param_groups} == {"head": 1e-3, "layer4": pytest.approx(1e-4)}
    assert second.state[head_param] is first.state[head_param]
    head_param.grad = None


def test_schedule_warmup_then_cosine_to_zero():
    schedule = LRSchedule("cosine", epochs=10, steps_per_epoch=4, warmup_epochs=2)
    warmup = [schedule.factor(0, step) for step in range(4)] + [schedule.factor(1, step) for step in range(4)]
    assert warmup == sorted(warmup) and 0 < warmup[0] < warmup[-1] <= 1
    assert schedule.factor(2) == pytest.approx(1.0)
    assert schedule.factor(9, 3) < 0.05


def test_step_and_plateau_schedules():
    assert LRSchedule("step", 10, 1, step_size=3, gamma=0.5).factor(7) == 0.25
    plateau = LRSchedule("plateau", 10, 1, gamma=0.1, plateau_patience=1)
    for loss in (1.0, 0.9, 0.95, 0.95):
        plateau.end_epoch(loss)
    assert plateau.factor(5) == pytest.approx(0.1)
    restored = LRSchedule("plateau", 10, 1)
    restored.load_state_dict(plateau.state_dict())
    assert restored.factor(5) == pytest.approx(0.1)


@pytest.mark.numerics
def test_gradual_unfreeze_in_a_real_run(tmp_path, demo_data):
    output = tmp_path / "gradual.pt"
    run_train(demo_data, output, strategy="gradual-unfreeze", unfreeze_every=1, epochs=2)
    epochs = json.loads(sibling(output, ".history.json").read_text())["epochs"]
    assert [row["trainable"] for row in epochs] == [["head"], ["head", "layer4"]]


def _trainable_names(model: PetClassifier) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_feature_extraction_trains_only_the_head():
    model = PetClassifier(3, arch="resnet18")
    set_trainable(model, ["head"])
    assert _trainable_names(model) == {name for name, _ in model.named_parameters() if name.startswith("head.")}
    set_trainable(model, ["head", "layer4"])
    assert all(name.startswith(("head.", "backbone.layer4.")) for name in _trainable_names(model))


def test_layer_groups_partition_every_parameter():
    for arch in ("resnet50", "mobilenet_v3_small"):
        model = PetClassifier(3, arch=arch)
        grouped = [id(p) for params in layer_groups(model).values() for p in params]
        assert sorted(grouped) == sorted(id(p) for p in model.parameters())
        assert all(layer_groups(model).values())


def test_unknown_group_is_refused_with_the_valid_list():
    model = PetClassifier(3, arch="resnet18")
    with pytest.raises(ValueError, match=r"unknown layer group\(s\) \['layer5'\].*valid: \['head', 'layer4'"):
        set_trainable(model, ["head", "layer5"])
    with pytest.raises(ValueError, match="features-late"):
        param_groups(model, 1e-3, {"features-late": 0.1})


def test_param_groups_have_per_group_learning_rates():
    model = PetClassifier(3, arch="resnet18")
    set_trainable(model, ["head", "layer4"])
    groups = param_groups(model, 1e-3, {"layer4": 0.1}, weight_decay=0.01)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-3), ("layer4", pytest.approx(1e-4))]
    assert sum(len(g["params"]) for g in groups) == len(_trainable_names(model))
    optimizer = torch.optim.AdamW(groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.01]


def test_frozen_batchnorm_stays_in_eval_mode_while_training():
    model = PetClassifier(3, arch="resnet18")
    set_trainable(model, ["head", "layer4"])
    train_mode(model)
    assert not model.backbone.bn1.training
    assert model.backbone.layer4[0].bn1.training
    assert model.head.training
    set_trainable(model, group_names(model))
    assert train_mode(model).backbone.bn1.training
