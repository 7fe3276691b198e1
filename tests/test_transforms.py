"""Train and eval transforms built from the bundle's preprocess entry."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from models.bundle import load_bundle
from models.transforms import AUGMENTATIONS, default_preprocess, eval_transform, train_transform


@pytest.fixture
def photo() -> Image.Image:
    return Image.open("tests/data/chelsea.jpg").convert("RGB")


def test_default_preprocess_follows_the_imagenet_recipe():
    assert default_preprocess(224) == {
        "resize": 256,
        "crop": 224,
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def test_eval_transform_is_deterministic_and_matches_the_bundle_sizes(tiny_bundle_path, photo):
    preprocess = load_bundle(tiny_bundle_path).preprocess
    transform = eval_transform(preprocess)
    first, second = transform(photo), transform(photo)
    assert first.shape == (3, preprocess["crop"], preprocess["crop"])
    assert first.dtype == torch.float32
    assert torch.equal(first, second)


def test_eval_transform_normalises_with_the_bundle_statistics():
    preprocess = {**default_preprocess(32), "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    assert torch.allclose(eval_transform(preprocess)(white), torch.ones(3, 32, 32))


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_train_presets_give_crop_sized_tensors(augment, photo):
    torch.manual_seed(0)
    out = train_transform(default_preprocess(48), augment)(photo)
    assert out.shape == (3, 48, 48)
    assert out.dtype == torch.float32


def test_train_augmentation_is_random():
    torch.manual_seed(0)
    transform = train_transform(default_preprocess(48), "standard")
    image = Image.open("tests/data/coffee.jpg").convert("RGB")
    assert not torch.equal(transform(image), transform(image))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interpolation": "lanczos9"}, "interpolation 'lanczos9' is not one of"),
        ({"resize": 10}, "resize 10 is smaller than crop 64"),
        ({"crop": 0}, "crop must be a positive int"),
        ({"mean": [0.5]}, "mean needs 3 values"),
        ({"std": [1, 0, 1]}, "std values must be > 0"),
    ],
)
def test_bad_preprocess_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        eval_transform({**default_preprocess(64), **change})


def test_unknown_augmentation_names_the_choices():
    with pytest.raises(ValueError, match="unknown augmentation 'heavy'; valid choices: none, light, standard, strong"):
        train_transform(default_preprocess(64), "heavy")
