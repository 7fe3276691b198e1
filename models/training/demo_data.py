"""A small deterministic labelled image set (ImageFolder layout) that a CNN learns in CPU minutes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Each class is a shape; colours are drawn around a per-class hue so the task is learnable
# quickly but colour alone is not a perfect cue.
CLASSES = {
    "circle": (220, 90, 60),
    "square": (70, 170, 80),
    "triangle": (60, 100, 210),
}
SIZES = ((96, 96), (128, 96), (96, 128), (160, 120), (120, 160), (112, 112))
SPLITS = ("train", "val")
PER_CLASS = 400  # training images per class; fewer left the demo model unable to flag noise (docs/training.md)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], spread: int = 70) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_image(shape: str, rng: random.Random) -> Image.Image:
    """One RGB picture of `shape` on a noisy background, with random size, position and colours."""
    return make_example(shape, rng)[0]


def make_example(shape: str, rng: random.Random) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """`make_image`'s picture and the shape's bounding box (left, top, right, bottom)."""
    width, height = rng.choice(SIZES)
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):  # distractor lines
        points = [(rng.randint(0, width), rng.randint(0, height)) for _ in range(2)]
        draw.line(points, fill=tuple(rng.randint(0, 255) for _ in range(3)), width=rng.randint(1, 3))
    side = rng.randint(min(width, height) // 3, int(min(width, height) * 0.8))
    x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (x0, y0, x0 + side, y0 + side)
    _draw_shape(draw, shape, box, _jitter(rng, CLASSES[shape]))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0))), box


def examples(split: str, shape: str, count: int, seed: int = 0):
    """(image, shape box) pairs exactly as make_demo_data writes DIR/split/shape/ (before JPEG encoding)."""
    rng = random.Random(f"{seed}/{split}/{list(CLASSES).index(shape)}")
    return [make_example(shape, rng) for _ in range(count)]


def noise_image(seed: int) -> Image.Image:
    """An unrelated input: uniform or Gaussian RGB noise of a random size (what `unknown` should flag)."""
    rng = np.random.default_rng(seed)
    height, width = rng.integers(48, 321, size=2)
    if rng.random() < 0.5:
        pixels = rng.integers(0, 256, size=(height, width, 3))
    else:
        pixels = np.clip(rng.normal(128, 60, size=(height, width, 3)), 0, 255).round()
    return Image.fromarray(pixels.astype(np.uint8))


def make_demo_data(
    out: str | Path, per_class: int = PER_CLASS, val_per_class: int | None = None, seed: int = 0
) -> Path:
    """Write DIR/{train,val}/<class>/*.jpg deterministically; return DIR."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    val_per_class = max(1, per_class // 4) if val_per_class is None else val_per_class
    out = Path(out)
    for split, count in zip(SPLITS, (per_class, val_per_class), strict=False):
        for shape in CLASSES:
            # One generator per (split, class): adding classes or images never changes the others.
            folder = out / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for number, (image, _) in enumerate(examples(split, shape, count, seed)):
                image.save(folder / f"{shape}_{number:04d}.jpg", quality=90)
    return out
