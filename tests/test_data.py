"""Data discovery, splitting and hygiene: class counts, unreadable files, train/val overlap."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.training.data import (
    DataError,
    ShardSampler,
    balanced_class_weights,
    clean,
    discover,
    oxford_pets,
    stratified_split,
)


def copy_tree(src: Path, dst: Path) -> Path:
    """A private, modifiable copy of a data set."""
    return Path(shutil.copytree(src, dst))


def test_discover_train_val_layout(demo_data, class_names):
    split = discover(demo_data)
    assert split.class_names == class_names
    assert split.counts() == {"train": dict.fromkeys(class_names, 12), "val": dict.fromkeys(class_names, 4)}


def test_single_tree_is_split_per_class(demo_data, class_names):
    split = discover(demo_data / "train", val_split=0.25, seed=3)
    assert split.counts()["val"] == dict.fromkeys(class_names, 3)
    assert not {p for p, _ in split.train} & {p for p, _ in split.val}
    assert discover(demo_data / "train", val_split=0.25, seed=3).val == split.val  # deterministic


def test_stratified_split_keeps_a_train_image_for_tiny_classes():
    train, val = stratified_split([("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 1)], 0.9, seed=0)
    assert {label for _, label in train} == {0, 1}
    assert {label for _, label in val} == {0, 1}


def test_unreadable_images_are_skipped_and_listed(tmp_path, demo_data):
    root = copy_tree(demo_data, tmp_path / "data")
    broken = root / "train" / "circle" / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    (root / "val" / "square" / "empty.png").write_bytes(b"")
    split = clean(discover(root))
    assert {Path(item["path"]).name for item in split.skipped} == {"broken.jpg", "empty.png"}
    assert all(item["error"] for item in split.skipped)
    assert str(broken) not in {p for p, _ in split.train}
    assert split.counts()["train"]["circle"] == 12


def test_overlap_is_refused_unless_allowed(tmp_path, demo_data):
    root = copy_tree(demo_data, tmp_path / "data")
    leaked = root / "val" / "circle" / "leaked.jpg"
    shutil.copy(root / "train" / "circle" / "circle_0003.jpg", leaked)
    with pytest.raises(DataError, match="`allow_overlap`") as error:
        clean(discover(root))
    assert "circle_0003.jpg" in str(error.value)
    assert "leaked.jpg" in str(error.value)
    assert str(leaked) in {p for p, _ in clean(discover(root), allow_overlap=True).val}


def test_unknown_val_class_is_an_error(tmp_path, demo_data):
    root = copy_tree(demo_data, tmp_path / "data")
    (root / "val" / "hexagon").mkdir()
    with pytest.raises(DataError, match="hexagon"):
        discover(root)


def test_balanced_weights_equalise_classes():
    weights = balanced_class_weights([("a", 0)] * 6 + [("b", 1)] * 2, num_classes=3)
    assert weights.tolist() == pytest.approx([8 / 18, 8 / 6, 0.0])


def test_shards_cover_every_index_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


def test_oxford_pets_offline_error_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="annotations.tar.gz"):
        oxford_pets(tmp_path, download=False)
