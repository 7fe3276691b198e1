"""Outlier exposure's pieces: the generated outliers, a folder of the user's negatives, the loss, the settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.training.config import SettingError, TrainConfig
from models.training.data import DataError
from models.training.demo_data import noise_image
from models.training.outliers import (
    FAMILIES,
    SyntheticOutliers,
    outlier_dataset,
    outlier_loader,
    synthetic_outlier,
    uniform_cross_entropy,
)
from models.transforms import default_preprocess, eval_transform

TRANSFORM = eval_transform(default_preprocess(32))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_draws_deterministic_varied_rgb_images(family):
    first, again, other = synthetic_outlier(5, family), synthetic_outlier(5, family), synthetic_outlier(6, family)
    assert first.mode == "RGB" and min(first.size) >= 64 and max(first.size) <= 256
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert first.size != other.size or not np.array_equal(np.asarray(first), np.asarray(other))
    assert np.asarray(first).std() > 3 or family == "blank-frame"  # not a flat image, unless an empty frame


def test_a_blank_frame_is_empty_nearly_everywhere():
    # Flat colour or a gentle gradient with a few thin strokes: almost every pair of neighbouring pixels is within
    # 2 grey levels (at least 0.82 over these 40 draws, the rest are strokes and JPEG block edges).
    for seed in range(40):
        grey = np.asarray(synthetic_outlier(seed, "blank-frame").convert("L"), dtype=np.float64)
        for axis in (0, 1):
            assert (np.abs(np.diff(grey, axis=axis)) <= 2).mean() >= 0.8, (seed, axis)


def neighbour_correlation(image: Image.Image) -> float:
    """The largest |correlation| between the grey image and itself shifted by up to 3 pixels (any direction)."""
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    height, width = pixels.shape
    shifts = [(dx, dy) for dx in range(4) for dy in range(4) if dx or dy]
    pairs = ((pixels[: height - dy, : width - dx], pixels[dy:, dx:]) for dx, dy in shifts)
    # A flat image (a blank frame without strokes) is perfectly predictable from its neighbours: correlation 1.
    return max(1.0 if a.std() == 0 or b.std() == 0 else abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in pairs)


def test_generated_outliers_are_not_white_noise():
    # Evaluation measures i.i.d. pixel noise (demo_data.noise_image); training must not draw that kind. White
    # noise is uncorrelated with itself shifted (measured: at most 0.034 over 50 noise images); every generated
    # family is correlated at some small shift (smooth, or periodic: at least 0.37 over 200 outliers).
    assert max(neighbour_correlation(noise_image(seed)) for seed in range(10)) < 0.1
    assert min(neighbour_correlation(synthetic_outlier(seed)) for seed in range(60)) > 0.25


def test_the_synthetic_source_is_indexable_and_the_loader_draws_batches():
    dataset = outlier_dataset("synthetic", TRANSFORM, seed=3)
    assert isinstance(dataset, SyntheticOutliers) and len(dataset) > 10**6
    image, label = dataset[7]
    assert image.shape == (3, 32, 32) and label == -1 and torch.equal(image, dataset[7][0])
    batches = list(outlier_loader(dataset, batch_size=4, batches=3, workers=0, seed=0))
    assert [tuple(images.shape) for images, _ in batches] == [(4, 3, 32, 32)] * 3


def test_a_folder_of_negatives_is_cycled_and_unreadable_files_skipped(tmp_path):
    (tmp_path / "cars").mkdir()
    for index in range(3):
        Image.new("RGB", (40, 30), (index * 80, 10, 10)).save(tmp_path / "cars" / f"{index}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    dataset = outlier_dataset(str(tmp_path), TRANSFORM)
    assert len(dataset) == 3
    batches = list(outlier_loader(dataset, batch_size=5, batches=2, workers=0, seed=0))
    assert len(batches) == 2 and batches[0][0].shape == (5, 3, 32, 32)  # 3 images, drawn with replacement


def test_an_empty_or_missing_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="has no readable images"):
        outlier_dataset(str(tmp_path), TRANSFORM)
    with pytest.raises(DataError, match="neither 'synthetic' nor a folder"):
        outlier_dataset(str(tmp_path / "missing"), TRANSFORM)


def test_uniform_cross_entropy_is_least_for_equal_logits():
    assert uniform_cross_entropy(torch.zeros(2, 3)).item() == pytest.approx(math.log(3))
    confident = torch.tensor([[5.0, 0.0, 0.0]])
    assert uniform_cross_entropy(confident).item() > math.log(3) + 1
    logits = torch.randn(4, 3, requires_grad=True)
    uniform_cross_entropy(logits).backward()
    assert torch.allclose(logits.grad.sum(dim=1), torch.zeros(4), atol=1e-6)  # shifting all logits changes nothing


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"outlier_exposure": -0.5}, "`outlier_exposure`=-0.5 is invalid: must be a number >= 0.0"),
        ({"outliers": "no/such/folder"}, "`outliers`='no/such/folder' is invalid: must be 'synthetic' or a folder"),
    ],
)
def test_bad_outlier_settings_name_the_setting(settings, message):
    with pytest.raises(SettingError) as info:
        TrainConfig(**settings)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("settings", "score"),
    [
        ({}, "energy"),
        ({"outlier_exposure": 0.5}, "max-probability"),
        ({"outlier_exposure": 0.5, "ood_score": "energy"}, "energy"),
        ({"ood_score": "mahalanobis"}, "mahalanobis"),
    ],
)
def test_the_auto_score_reads_what_the_training_taught(settings, score):
    assert TrainConfig(**settings).resolved_ood_score == score
