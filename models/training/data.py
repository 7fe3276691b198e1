"""Training data: find the images, split them, check them (readable, no train/val overlap) and load them."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from models.images import ImageError, decode_image, load_image

OXFORD_PETS_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
MAX_LISTED_PAIRS = 5

Sample = tuple[str, int]


class DataError(ValueError):
    """The data set cannot be used as given; the message says what to change."""


@dataclass
class DataSplit:
    """Class names plus train and validation samples (path, class index), and what was left out and why."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    source: str
    skipped: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class for each split, e.g. {'train': {'cat': 10}, 'val': {'cat': 3}}."""
        return {split: class_counts(getattr(self, split), self.class_names) for split in ("train", "val")}


def class_counts(samples: list[Sample], class_names: list[str]) -> dict[str, int]:
    """Images per class name (classes without images count 0)."""
    counter = Counter(label for _, label in samples)
    return {name: counter.get(index, 0) for index, name in enumerate(class_names)}


def class_folders(root: Path) -> list[str]:
    """Sorted class-folder names under an ImageFolder root."""
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    names = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    return names


def image_files(folder: Path) -> list[Path]:
    """Image files (by extension) anywhere under `folder`, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def folder_samples(root: Path, class_names: list[str]) -> list[Sample]:
    """Every image file under root/<class>/ (recursively), labelled by its class folder's index in class_names."""
    unknown = sorted(set(class_folders(root)) - set(class_names))
    if unknown:
        raise DataError(f"{root} has class folders {unknown} that are not among the classes {class_names}")
    samples = []
    for index, name in enumerate(class_names):
        folder = root / name
        if folder.is_dir():
            samples.extend((str(path), index) for path in image_files(folder))
    return samples


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split every class by `fraction` into (train, val); each class with 2+ images gives at least one to val."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"`val_split` must be in (0, 1), got {fraction}")
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        random.Random(f"{seed}/{label}").shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return sorted(train), sorted(val)


def discover(data_dir: str | Path, val_split: float = 0.2, seed: int = 0) -> DataSplit:
    """DIR/train + DIR/val, or DIR/train alone / a bare DIR/<class>/ tree split by `val_split` per class."""
    root = Path(data_dir)
    train_root = root / "train" if (root / "train").is_dir() else root
    class_names = class_folders(train_root)
    if len(class_names) < 2:
        raise DataError(f"{train_root} has {len(class_names)} class folder(s); at least 2 are needed")
    train = folder_samples(train_root, class_names)
    if (root / "val").is_dir():
        return DataSplit(class_names, train, folder_samples(root / "val", class_names), f"{root} (train/ + val/)")
    train, val = stratified_split(train, val_split, seed)
    return DataSplit(class_names, train, val, f"{train_root} (split {val_split:.0%} per class for validation)")


def oxford_pets(root: str | Path, download: bool = True) -> DataSplit:
    """Oxford-IIIT Pet from torchvision: 'trainval' to train on, 'test' to validate on (37 breeds)."""
    from torchvision.datasets import OxfordIIITPet

    try:
        splits = {name: OxfordIIITPet(str(root), split=name, download=download) for name in ("trainval", "test")}
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a missing offline copy is a RuntimeError
        raise DataError(
            f"cannot get Oxford-IIIT Pet into {root}: {error}. Without internet access, download images.tar.gz "
            f"and annotations.tar.gz from {OXFORD_PETS_URL} elsewhere, extract both into "
            f"{Path(root) / 'oxford-iiit-pet'}, and run again (or set `data_dir` to your own ImageFolder)."
        ) from error
    # torchvision keeps the file list in private attributes (stable from 0.12 to at least 0.29).
    samples = {name: [(str(p), int(y)) for p, y in zip(ds._images, ds._labels)] for name, ds in splits.items()}
    class_names = list(splits["trainval"].classes)
    return DataSplit(class_names, samples["trainval"], samples["test"], f"Oxford-IIIT Pet at {root}")


def _check_file(path: str) -> tuple[str | None, str | None]:
    """(sha256 of the bytes, None) for a decodable image; (None, reason) otherwise."""
    try:
        data = Path(path).read_bytes()
        decode_image(data)  # the exact decoder training and serving use
    except (OSError, ImageError) as error:
        return None, f"{type(error).__name__}: {error}"
    return hashlib.sha256(data).hexdigest(), None


def scan(samples: list[Sample], workers: int = 4) -> tuple[list[Sample], list[str], list[dict]]:
    """Decode every file once: (readable samples, their sha256 hashes, [{'path', 'error'}] for the rest)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(_check_file, [path for path, _ in samples]))
    kept, hashes, skipped = [], [], []
    for sample, (digest, error) in zip(samples, results):
        if error is None:
            kept.append(sample)
            hashes.append(digest)
        else:
            skipped.append({"path": sample[0], "error": error})
    return kept, hashes, skipped


def find_overlap(train: list[Sample], train_hashes: list[str], val: list[Sample], val_hashes: list[str]):
    """[(train path, val path)] for files whose bytes appear in both splits."""
    by_hash: dict[str, str] = {}
    for (path, _), digest in zip(train, train_hashes):
        by_hash.setdefault(digest, path)
    return [(by_hash[digest], path) for (path, _), digest in zip(val, val_hashes) if digest in by_hash]


def clean(split: DataSplit, allow_overlap: bool = False, workers: int = 4) -> DataSplit:
    """Drop unreadable images (listed in `skipped`) and refuse identical files in train and val."""
    train, train_hashes, skipped_train = scan(split.train, workers)
    val, val_hashes, skipped_val = scan(split.val, workers)
    pairs = find_overlap(train, train_hashes, val, val_hashes)
    if pairs and not allow_overlap:
        listed = "\n".join(f"  {a}  ==  {b}" for a, b in pairs[:MAX_LISTED_PAIRS])
        more = f"\n  ... and {len(pairs) - MAX_LISTED_PAIRS} more" if len(pairs) > MAX_LISTED_PAIRS else ""
        raise DataError(
            f"{len(pairs)} validation image(s) are byte-identical to training images, which inflates validation "
            f"scores:\n{listed}{more}\nRemove the duplicates, or set `allow_overlap` to train anyway."
        )
    skipped = split.skipped + skipped_train + skipped_val
    for split_name, samples in (("train", train), ("val", val)):
        if not samples:
            raise DataError(f"no readable {split_name} images in {split.source}")
    return DataSplit(split.class_names, train, val, split.source, skipped)


def balanced_class_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """Per-class loss weights n / (k * n_c), so every class counts equally overall (absent classes get 0)."""
    counts = torch.bincount(torch.tensor([label for _, label in samples]), minlength=num_classes).float()
    weights = len(samples) / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


class ImageList(Dataset):
    """(tensor, label) pairs from (path, label) samples, decoded by models.images.load_image."""

    def __init__(self, samples: list[Sample], transform, min_size: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_image(path, min_size=self.min_size)), label


class ShardSampler(Sampler[int]):
    """Every world_size-th index from rank, without DistributedSampler's padding, so metrics count each image once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(samples: list[Sample], num_classes: int, balanced: bool, rank: int, world_size: int, seed: int):
    """A shuffling sampler: class-balanced with replacement, distributed, or None (the loader shuffles)."""
    if balanced:
        if world_size > 1:
            raise DataError("`balanced_sampler` is single-process only; use `class_weights` balanced with torchrun")
        per_class = balanced_class_weights(samples, num_classes)
        weights = per_class[torch.tensor([label for _, label in samples])].double()
        generator = torch.Generator().manual_seed(seed)
        return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=generator)
    if world_size > 1:
        return DistributedSampler(range(len(samples)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return None


def make_loader(dataset: Dataset, batch_size: int, workers: int, sampler=None, shuffle=False, seed=0, pin=False):
    """A DataLoader with seeded shuffling and persistent workers; training drops a last batch of one image."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        # Batch norm cannot normalise a batch of one image in training mode.
        drop_last=shuffle and len(sampler if sampler is not None else dataset) % batch_size == 1,
    )


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch for each process."""
    return max(1, math.ceil(math.ceil(num_samples / world_size) / batch_size))
