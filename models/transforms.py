"""Train and eval transforms, built from a bundle's `preprocess` entry alone."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
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
PIL_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
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


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to `short_side`, the long side truncated (torchvision's rule)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def _crop_offsets(resized: tuple[int, int], crop: int) -> tuple[int, int]:
    """(left, top) of torchvision's CenterCrop in an image of size `resized`."""
    return round((resized[0] - crop) / 2.0), round((resized[1] - crop) / 2.0)


def crop_box(size: tuple[int, int], preprocess: dict) -> tuple[float, float, float, float]:
    """Where the eval transform's centre crop lies in an image of `size` (width, height): (left, top, right, bottom)."""
    resized = resized_size(*size, preprocess["resize"])
    (left, top), crop = _crop_offsets(resized, preprocess["crop"]), preprocess["crop"]
    sx, sy = size[0] / resized[0], size[1] / resized[1]
    return (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)


def resize_crop(image: Image.Image, preprocess: dict) -> Image.Image:
    """Resize the short side to `resize`, centre-crop `crop`: torchvision's Resize + CenterCrop geometry.

    One PIL resample over the crop's source box instead of resizing the whole image, then cropping: a fraction of
    the CPU of torchvision's v2 pipeline, and no OpenMP team in request threads. It differs from the two-step resize
    by at most one intensity level on a few pixels in ten thousand (float rounding of the box); nearest-neighbour
    keeps two steps, where that rounding could pick the neighbouring pixel.
    """
    crop, resample = preprocess["crop"], PIL_RESAMPLING[preprocess["interpolation"]]
    resized = resized_size(*image.size, preprocess["resize"])
    if resized != image.size and preprocess["interpolation"] == "nearest":
        image = image.resize(resized, resample)
    if resized == image.size:
        left, top = _crop_offsets(resized, crop)
        return image.crop((left, top, left + crop, top + crop))
    return image.resize((crop, crop), resample, box=crop_box(image.size, preprocess))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> its uint8 pixels as a (3, H, W) tensor (channels-last strides; no torch kernel runs)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def mirrored(pixels: torch.Tensor) -> torch.Tensor:
    """The horizontal mirror of (3, H, W) pixels; on the CPU through numpy (no torch kernel, so no OpenMP team)."""
    if pixels.device.type != "cpu":
        return pixels.flip(-1)
    return torch.from_numpy(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()[:, ::-1])).permute(2, 0, 1)


class Normalizer:
    """uint8 pixels (3, H, W) or (B, 3, H, W) -> float32 (pixel - 255 mean) / (255 std), same device and layout."""

    def __init__(self, preprocess: dict):
        self.mean = torch.tensor(preprocess["mean"], dtype=torch.float32).mul(255).view(3, 1, 1)
        self.std = torch.tensor(preprocess["std"], dtype=torch.float32).mul(255).view(3, 1, 1)

    def to(self, device: torch.device | str) -> Normalizer:
        """A copy with its statistics on `device` (for pixels decoded or stacked there)."""
        moved = copy.copy(self)
        moved.mean, moved.std = self.mean.to(device), self.std.to(device)
        return moved

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().sub_(self.mean).div_(self.std)


class EvalTransform:
    """RGB PIL image -> normalised (3, crop, crop) float tensor, in two halves the service runs on two threads.

    `pixels` (PIL only, no torch kernel: request threads) and `normalize` (one torch op per batch: the batcher);
    `__call__` is both for one image. Training's validation, evaluate.py, predict.py, calibration, quantization
    and serving all use this, so they compute on identical tensors.
    """

    def __init__(self, preprocess: dict):
        validate_preprocess(preprocess)
        self.preprocess = dict(preprocess)
        self.normalize = Normalizer(preprocess)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The uint8 (3, crop, crop) pixels the network sees, before normalisation."""
        return to_pixels(resize_crop(image if image.mode == "RGB" else image.convert("RGB"), self.preprocess))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image)).contiguous()


def eval_transform(preprocess: dict) -> EvalTransform:
    """Deterministic: resize the short side, centre-crop, normalise (see EvalTransform). Serving uses this."""
    return EvalTransform(preprocess)


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
    # The same normalisation as evaluation and serving (Normalizer), after the random geometry and colour.
    steps = [*_augmentations(preprocess, augment), v2.PILToTensor(), Normalizer(preprocess)]
    if augment == "strong":
        steps.append(v2.RandomErasing(p=0.25))
    return v2.Compose(steps)
