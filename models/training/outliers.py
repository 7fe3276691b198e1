"""Outlier exposure (Hendrycks et al., ICLR 2019): auxiliary images of no class, trained towards the uniform
distribution so the model learns what "none of my classes" looks like.

The outliers come from `synthetic_outlier` (generated, never the evaluation noise of demo_data.noise_image) or
from a folder of the user's own negative images (photos of things that are none of the classes).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset, RandomSampler

from models.training.data import DataError, ImageList, image_files, scan

SYNTHETIC = "synthetic"
# Families of generated outliers. None of them is i.i.d. pixel noise (uniform or Gaussian, what evaluate.py
# --noise and the tests measure), so that measurement stays a check on images of a kind never trained on.
# blank-frame (nothing in the picture) steadies the demo model's noise flagging; shaded-leaves (large shaded,
# grained shapes: photo-like) with the demo's outlier weight at 1.0 gets photos flagged too (README "Unknown inputs").
FAMILIES = ("dead-leaves", "pink-noise", "smooth-field", "texture", "blank-frame", "shaded-leaves")
POOL = 1 << 24  # distinct synthetic outliers an index can name; every draw is effectively a new image


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _leaf_radius(rng: np.random.Generator, low: float, high: float) -> float:
    """A radius between low and high with density ~ 1/r^3 (the dead-leaves size law), by inverse transform sampling."""
    u = rng.random()
    return 1 / math.sqrt(u / high**2 + (1 - u) / low**2)


def dead_leaves(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Many overlapping random shapes with power-law sizes (the dead-leaves model: natural-image statistics)."""
    image = Image.new("RGB", (width, height), _colour(rng))
    draw = ImageDraw.Draw(image)
    low, high = max(2.0, min(width, height) / 40), min(width, height) / 2
    for _ in range(int(rng.integers(150, 400))):
        radius = _leaf_radius(rng, low, high)
        x, y = rng.uniform(-radius, width + radius), rng.uniform(-radius, height + radius)
        box = (x - radius, y - radius, x + radius, y + radius * rng.uniform(0.5, 1.5))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=_colour(rng))
        elif kind == 1:
            draw.rectangle(box, fill=_colour(rng))
        else:
            points = [(x + radius * math.cos(a), y + radius * math.sin(a)) for a in rng.uniform(0, 2 * math.pi, 5)]
            draw.polygon(points, fill=_colour(rng))
    return image


def pink_noise(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Coloured noise with a 1/f^beta spectrum, beta in [1, 3] (white noise, beta 0, is left to evaluation)."""
    beta = rng.uniform(1.0, 3.0)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(3, *radius.shape)) + 1j * rng.normal(size=(3, *radius.shape))) / radius ** (beta / 2)
    spectrum[:, 0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(height, width))
    field = np.einsum("ij,jhw->hwi", rng.normal(size=(3, 3)), field)  # correlated colour channels
    field = (field - field.mean()) / (field.std() + 1e-8)
    pixels = rng.uniform(60, 190) + rng.uniform(20, 70) * field
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def smooth_field(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A few random colours on a coarse grid, upsampled smoothly: gradients and blobs."""
    cells = rng.integers(2, 9, size=2)
    grid = rng.integers(0, 256, size=(cells[0], cells[1], 3)).astype(np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)


def texture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A sum of one to three coloured sinusoidal gratings, or a checkerboard: periodic textures."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if rng.random() < 0.25:
        size = rng.integers(3, 24)
        pattern = ((x // size + y // size) % 2)[..., None]
        pixels = pattern * np.array(_colour(rng)) + (1 - pattern) * np.array(_colour(rng))
    else:
        pixels = np.zeros((height, width, 3)) + np.array(_colour(rng)) / 2
        for _ in range(int(rng.integers(1, 4))):
            angle, period = rng.uniform(0, math.pi), rng.uniform(3, 40)
            wave = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + rng.uniform(0, 6.3))
            pixels += wave[..., None] * (np.array(_colour(rng)) - 128) / 2
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def blank_frame(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A flat colour or a soft two-colour gradient, with up to five thin strokes and no object: an empty frame."""
    image = Image.new("RGB", (width, height), _colour(rng))
    if rng.random() < 0.5:
        horizontal = rng.random() < 0.5
        ramp = np.linspace(0.0, 1.0, width if horizontal else height)[:, None]
        ends = np.array([_colour(rng), _colour(rng)], dtype=np.float64)
        colours = ends[0] * (1 - ramp) + ends[1] * ramp  # (length, 3)
        grid = colours[None] if horizontal else colours[:, None]
        image = Image.fromarray(np.broadcast_to(grid, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 6))):
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(points, fill=_colour(rng), width=int(rng.integers(1, 4)))
    return image


def _grain(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width) grey 1/f noise of unit variance: the grain of fur, paper, wood or skin."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    radius = np.maximum(np.hypot(fy, fx), 1 / max(width, height))
    spectrum = rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)
    grain = np.fft.irfft2(spectrum / radius, s=(height, width))
    return grain / (grain.std() + 1e-8)


def _leaf_mask(rng: np.random.Generator, size: tuple[int, int], cx: float, cy: float, radius: float) -> np.ndarray:
    """(height, width, 1) coverage in [0, 1] of an ellipse or a hexagon-like polygon with a soft edge."""
    mask = Image.new("L", size)
    draw = ImageDraw.Draw(mask)
    box = (cx - radius, cy - radius * rng.uniform(0.5, 1.0), cx + radius, cy + radius * rng.uniform(0.5, 1.0))
    if rng.random() < 0.6:
        draw.ellipse(box, fill=255)
    else:
        angles = np.sort(rng.uniform(0, 2 * math.pi, 6))
        draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles], fill=255)
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2))), dtype=np.float64)[..., None] / 255


def shaded_leaves(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Large overlapping shapes, each shaded by a gradient and grained by 1/f texture: photo-like occlusion."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    grain = _grain(rng, width, height)
    pixels = np.zeros((height, width, 3))
    low, high = min(width, height) / 8, min(width, height) * 0.9
    for layer in range(int(rng.integers(3, 13))):
        radius = _leaf_radius(rng, low, high)  # as in dead_leaves, but big: few fill the frame, as objects do in photos
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        angle = rng.uniform(0, 2 * math.pi)
        scale = max(width, height) if layer == 0 else radius  # the first shape is the background
        ramp = ((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)) / scale  # shading across the shape
        texture = np.roll(grain, tuple(int(v) for v in rng.integers(0, (height, width))), axis=(0, 1))
        colour = np.array(_colour(rng), dtype=np.float64)
        colour = colour.mean() + rng.uniform(0.2, 1.0) * (colour - colour.mean())  # photos are rarely saturated
        fill = colour + rng.uniform(10, 60) * ramp[..., None]
        fill = fill + rng.uniform(0, 40) * texture[..., None] * rng.uniform(0.5, 1.0, size=3)
        if layer == 0:
            pixels = fill
            continue
        inside = _leaf_mask(rng, (width, height), cx, cy, radius)
        pixels = pixels * (1 - inside) + fill * inside
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


GENERATORS = {
    "dead-leaves": dead_leaves,
    "pink-noise": pink_noise,
    "smooth-field": smooth_field,
    "texture": texture,
    "blank-frame": blank_frame,
    "shaded-leaves": shaded_leaves,
}


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Sometimes blurred, sometimes re-encoded as a low-quality JPEG: the artefacts real inputs carry."""
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3.0)))
    if rng.random() < 0.3:
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=int(rng.integers(10, 60)))
        image = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
    return image


def synthetic_outlier(seed: int, family: str | None = None) -> Image.Image:
    """One generated outlier of a random size (a random family unless given); the same seed, the same image."""
    rng = np.random.default_rng(seed)
    family = family or FAMILIES[int(rng.integers(len(FAMILIES)))]
    width, height = (int(v) for v in rng.integers(64, 257, size=2))
    return degrade(GENERATORS[family](rng, width, height), rng)


class SyntheticOutliers(Dataset):
    """Generated outliers through a transform, labelled -1; index i is always the same image."""

    def __init__(self, transform, seed: int = 0, count: int = POOL):
        self.transform, self.seed, self.count = transform, seed, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.transform(synthetic_outlier(self.seed * POOL + index)), -1


def outlier_dataset(source: str, transform, seed: int = 0) -> Dataset:
    """`synthetic`, or a folder of negative images (any layout, recursively; unreadable files skipped)."""
    if source == SYNTHETIC:
        return SyntheticOutliers(transform, seed)
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(f"`outliers` {source!r} is neither {SYNTHETIC!r} nor a folder of images")
    files, _, _ = scan([(str(path), -1) for path in image_files(folder)])
    if not files:
        raise DataError(f"`outliers` folder {folder} has no readable images")
    return ImageList(files, transform)


def outlier_loader(dataset: Dataset, batch_size: int, batches: int, workers: int, seed: int) -> DataLoader:
    """`batches` random batches per pass (with replacement: a small folder is cycled, the generated pool is not)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * batches, generator=generator)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, persistent_workers=workers > 0
    )


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the uniform distribution to softmax(logits): the outlier-exposure loss.

    Per row, -mean_c log softmax(logits)_c = logsumexp(logits) - mean(logits); its least value, log C, is reached
    only when all logits are equal.
    """
    logits = logits.float()
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()
