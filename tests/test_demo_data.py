"""The demo dataset: ImageFolder layout, variety and determinism."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from PIL import Image
from torchvision.datasets import ImageFolder

from models.training.demo_data import CLASSES, make_demo_data


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


def test_layout_is_imagefolder(demo_data):
    for split, per_class in (("train", 12), ("val", 4)):
        dataset = ImageFolder(demo_data / split)
        assert dataset.classes == sorted(CLASSES)
        assert len(dataset) == per_class * len(CLASSES)
    assert len(CLASSES) >= 3


def test_images_vary_in_size_and_aspect_ratio(demo_data):
    sizes = {Image.open(p).size for p in (demo_data / "train").rglob("*.jpg")}
    assert len(sizes) >= 3
    assert len({round(w / h, 2) for w, h in sizes}) >= 3


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = _digests(make_demo_data(tmp_path / "a", per_class=3, seed=7))
    second = _digests(make_demo_data(tmp_path / "b", per_class=3, seed=7))
    other = _digests(make_demo_data(tmp_path / "c", per_class=3, seed=8))
    assert first == second
    assert set(first) == set(other)
    assert all(first[name] != other[name] for name in first)


def test_no_image_is_both_in_train_and_val(demo_data):
    digests = _digests(demo_data)
    train = {v for k, v in digests.items() if k.startswith("train/")}
    val = {v for k, v in digests.items() if k.startswith("val/")}
    assert not train & val


def test_command_line_writes_the_dataset(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "scripts/make_demo_data.py", "--out", str(out), "--per-class", "2", "--seed", "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote demo data" in result.stdout
    assert len(list((out / "train").rglob("*.jpg"))) == 2 * len(CLASSES)
    assert len(list((out / "val").rglob("*.jpg"))) == 1 * len(CLASSES)
