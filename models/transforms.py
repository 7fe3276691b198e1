"""Train and eval transforms, built from a bundle's `preprocess` entry alone."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's classification recipes resize to crop / 0.875 before the centre crop (256 -> 224).
RESIZE_RATIO = 0.875
INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
AUGMENTATIONS = ("none", "light", "standard", "strong")
PREPROCESS_KEYS = ("resize", "crop", "interpolation", "mean", "std")


def default_preprocess(image_size: int = 224, interpolation: str = "bilinear") -> dict:
    """The ImageNet-style eval preprocessing for a given crop size, as plain types."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    preprocess = {
        "resize": round(image_size / RESIZE_RATIO),
        "crop": int(image_size),
        "interpolation": interpolation,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    validate_preprocess(preprocess)
    return preprocess


def validate_preprocess(preprocess: dict) -> None:
    """Raise ValueError naming the bad entry when `preprocess` cannot build a transform."""
    if not isinstance(preprocess, dict):
        raise ValueError(f"preprocess must be a dict, got {type(preprocess).__name__}")
    missing = [k for k in PREPROCESS_KEYS if k not in preprocess]
    if missing:
        raise ValueError(f"preprocess is missing {missing}; required: {list(PREPROCESS_KEYS)}")
    if preprocess["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"preprocess interpolation {preprocess['interpolation']!r} is not one of {sorted(INTERPOLATIONS)}"
        )
    for key in ("resize", "crop"):
        if not isinstance(preprocess[key], int) or preprocess[key] < 1:
            raise ValueError(f"preprocess {key} must be a positive int, got {preprocess[key]!r}")
    if preprocess["resize"] < preprocess["crop"]:
        raise ValueError(f"preprocess resize {preprocess['resize']} is smaller than crop {preprocess['crop']}")
    for key in ("mean", "std"):
        if len(preprocess[key]) != 3:
            raise ValueError(f"preprocess {key} needs 3 values (RGB), got {preprocess[key]!r}")
    if any(s <= 0 for s in preprocess["std"]):
        raise ValueError(f"preprocess std values must be > 0, got {preprocess['std']!r}")


def _to_normalized_tensor(preprocess: dict) -> list:
    return [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocess["mean"]), std=list(preprocess["std"])),
    ]


def eval_transform(preprocess: dict) -> v2.Compose:
    """Deterministic: resize the short side, centre-crop, to float tensor, normalise. Serving uses this."""
    validate_preprocess(preprocess)
    interpolation = INTERPOLATIONS[preprocess["interpolation"]]
    return v2.Compose(
        [
            # Resizing the PIL image (not a tensor) is fastest and releases the GIL while it works.
            v2.Resize(preprocess["resize"], interpolation=interpolation, antialias=True),
            v2.CenterCrop(preprocess["crop"]),
            *_to_normalized_tensor(preprocess),
        ]
    )


def _augmentations(preprocess: dict, augment: str) -> list:
    crop = preprocess["crop"]
    interpolation = INTERPOLATIONS[preprocess["interpolation"]]
    random_crop = v2.RandomResizedCrop(crop, interpolation=interpolation, antialias=True)
    if augment == "light":
        return [
            v2.RandomResizedCrop(crop, scale=(0.5, 1.0), interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    if augment == "standard":
        return [
            random_crop,
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(15),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ]
    return [random_crop, v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(interpolation=interpolation)]


def train_transform(preprocess: dict, augment: str = "standard") -> v2.Compose:
    """Training transform for an augmentation preset; 'none' is the eval transform."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; valid choices: {', '.join(AUGMENTATIONS)}")
    if augment == "none":
        return eval_transform(preprocess)
    validate_preprocess(preprocess)
    steps = [*_augmentations(preprocess, augment), *_to_normalized_tensor(preprocess)]
    if augment == "strong":
        steps.append(v2.RandomErasing(p=0.25))
    return v2.Compose(steps)
