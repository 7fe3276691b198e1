"""Train and eval transforms built from the bundle's preprocess entry."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from models.bundle import load_bundle
from models.transforms import (
    AUGMENTATIONS,
    INTERPOLATIONS,
    default_preprocess,
    eval_transform,
    mirrored,
    train_transform,
)


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


def _torchvision_pixels(image: Image.Image, preprocess: dict) -> torch.Tensor:
    """The two-step reference: torchvision's Resize(short side) then CenterCrop, as uint8 (3, crop, crop)."""
    resize = v2.Resize(preprocess["resize"], interpolation=INTERPOLATIONS[preprocess["interpolation"]], antialias=True)
    return v2.PILToTensor()(v2.CenterCrop(preprocess["crop"])(resize(image)))


@pytest.mark.parametrize("name", ["chelsea", "astronaut", "coffee", "rocket"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_pixels_are_torchvisions_resize_and_centre_crop(name, interpolation):
    """One PIL resample over the crop's box: the same geometry; values within one level on a few pixels in 1e4."""
    image = Image.open(f"tests/data/{name}.jpg").convert("RGB")
    preprocess = {**default_preprocess(224), "interpolation": interpolation}
    pixels, expected = eval_transform(preprocess).pixels(image), _torchvision_pixels(image, preprocess)
    assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape == (3, 224, 224)
    difference = (pixels.int() - expected.int()).abs()
    assert difference.max() <= (0 if interpolation == "nearest" else 1)
    assert (difference > 0).float().mean() < 1e-3


def test_an_image_at_the_resize_size_is_only_cropped():
    image = Image.open("tests/data/chelsea.jpg").convert("RGB").resize((384, 256))
    preprocess = default_preprocess(224)
    assert torch.equal(eval_transform(preprocess).pixels(image), _torchvision_pixels(image, preprocess))


def test_normalising_a_batch_equals_normalising_each_image(photo):
    """Serving normalises once per (channels-last) batch; evaluation one image at a time: the same floats."""
    transform = eval_transform(default_preprocess(64))
    pixels = [transform.pixels(photo), mirrored(transform.pixels(photo))]
    batch = transform.normalize(torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2))
    assert torch.equal(batch[0], transform(photo)) and torch.equal(batch[1], transform(photo).flip(-1))
