"""PetClassifier: construction, head shapes and weights (layer groups and freezing: tests/test_strategies.py)."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

from models.pet_classifier import HeadConfig, PetClassifier, WeightsUnavailableError, imagenet_weights_cached
from models.training.strategies import group_names


@pytest.mark.parametrize(
    ("arch", "feature_dim", "groups"),
    [
        ("resnet18", 512, ("head", "layer4", "layer3", "rest")),
        ("resnet34", 512, ("head", "layer4", "layer3", "rest")),
        ("resnet50", 2048, ("head", "layer4", "layer3", "rest")),
        ("resnet101", 2048, ("head", "layer4", "layer3", "rest")),
        ("mobilenet_v3_small", 1024, ("head", "features-late", "features-mid", "rest")),
        ("efficientnet_b0", 1280, ("head", "features-late", "features-mid", "rest")),
    ],
)
def test_construction_and_head_shape(arch, feature_dim, groups):
    model = PetClassifier(5, arch=arch).eval()
    assert model.feature_dim == feature_dim
    assert group_names(model) == groups
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(feature_dim, 512), (512, 5)]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_default_head_is_the_practitioners_head():
    head = PetClassifier(4, arch="resnet18").head
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].p, head[3].p) == (0.5, 0.3)


def test_configurable_head():
    model = PetClassifier(3, arch="resnet18", head={"hidden": 0, "dropout": 0.2})
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear"]
    assert model.head[1].out_features == 3
    assert PetClassifier(3, arch="resnet18", head=HeadConfig(hidden=64)).head[1].out_features == 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet5000"}, "unknown arch 'resnet5000'; valid choices: "),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"head": {"hidden": -1}}, "hidden width must be >= 0"),
        ({"head": {"dropout": 1.5}}, "dropout must be in [0, 1)"),
        ({"head": {"width": 3}}, "unknown head keys ['width']"),
    ],
)
def test_bad_construction_names_the_value(kwargs, message):
    kwargs = {"num_classes": 3, "arch": "resnet18", **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        PetClassifier(**kwargs)


def test_weights_from_local_state_dict_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = PetClassifier(3, arch="resnet18", weights=str(path))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is neither a file nor one of: none, imagenet"),
        (b"not a torch file", "cannot read weights file"),
        ({"conv1.weight": torch.zeros(1)}, "does not fit resnet18"),
    ],
)
def test_bad_weights_file_is_refused(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsUnavailableError, match=message):
        PetClassifier(3, arch="resnet18", weights=str(path))


def test_imagenet_offline_error_says_how_to_seed_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # An unreachable proxy makes the download fail fast and the same way with or without internet.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert not imagenet_weights_cached("resnet18")
    with pytest.raises(WeightsUnavailableError) as info:
        PetClassifier(3, arch="resnet18", weights="imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "`weights`" in message  # the setting; scripts/train.py turns it into --weights


def test_imagenet_weights_come_from_a_seeded_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    seeded = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(seeded.state_dict(), cache / url.rsplit("/", 1)[1])
    assert imagenet_weights_cached("resnet18")
    model = PetClassifier(3, arch="resnet18", weights="imagenet")
    assert torch.equal(model.backbone.conv1.weight, seeded.conv1.weight)
