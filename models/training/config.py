"""The training configuration: one frozen, validated value that drives the trainer, with or without a CLI.

Library errors name settings in backticks (`val_split`); `flag_message` turns them into the CLI's flags
(--val-split), so the same check reads right in a notebook and on the command line.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from models.bundle import DEFAULT_BUNDLE_PATH
from models.ood import SCORES
from models.runtime import AMP_CHOICES
from models.training.ood import DEFAULT_SCORE
from models.training.outliers import SYNTHETIC
from models.training.strategies import OPTIMIZERS, SCHEDULERS, STRATEGIES
from models.transforms import AUGMENTATIONS

DATASETS = ("folder", "oxford-pets")
CLASS_WEIGHTS = ("none", "balanced")
CHECKPOINT_SUFFIX = ".ckpt"
TENSORBOARD_SUFFIX = ".tb"

# `make run`: a model whose answers and unknown flag mean something, in about 10 CPU minutes on data/demo (1,200
# training images). Measured (README "Unknown inputs"): with 120 images and no outlier exposure the demo flagged 13% of
# noise images and none of the 4 photos; 10 epochs over 1,200 images with outlier exposure 0.5 flagged 90-100% of
# the noise and 2 to 4 of the photos (five trainings); weight 1.0 with the shaded-leaves outliers added flags all of
# both (five trainings measured).
DEMO_PRESET = {
    "arch": "resnet18",
    "weights": "auto",
    "image_size": 64,
    "epochs": 10,
    "batch_size": 16,
    "lr": 2e-3,
    "augment": "light",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.0,
    "patience": 0,
    "device": "cpu",
    "workers": 2,
    "outlier_exposure": 1.0,
}


class SettingError(ValueError):
    """A training setting has a bad value; the message names the setting in backticks."""


def default_workers() -> int:
    """Data-loader processes: up to 4, never more than the cores."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; field names are the CLI's flags with underscores."""

    # data
    data_dir: str | None = None
    dataset: str = "folder"
    dataset_root: str = "data/oxford-pets"
    val_split: float = 0.2
    allow_overlap: bool = False
    image_size: int = 224
    augment: str = "standard"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    class_weights: str = "none"
    balanced_sampler: bool = False
    workers: int = default_workers()
    # model
    arch: str = "resnet50"
    weights: str = "imagenet"
    head_hidden: int = 512
    dropout: float = 0.5
    # optimisation
    strategy: str = "fine-tune"
    unfreeze_every: int = 2
    epochs: int = 15
    batch_size: int = 32
    opt: str = "adamw"
    lr: float | None = None
    lr_mults: str = "auto"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    lr_step_size: int = 5
    lr_gamma: float = 0.1
    plateau_patience: int = 2
    label_smoothing: float = 0.1
    patience: int = 5
    # run
    output: str = DEFAULT_BUNDLE_PATH
    checkpoint: str | None = None
    resume: str | None = None
    device: str = "auto"
    amp: str = "auto"
    sync_bn: bool = False
    seed: int = 0
    log_dir: str | None = None
    # unknown inputs: outlier exposure while training, the detector fitted after it
    outlier_exposure: float = 0.0
    outliers: str = "synthetic"
    ood_score: str = "auto"

    def __post_init__(self):
        _check_choices(self)
        _check_ranges(self)

    @classmethod
    def demo(cls, **overrides) -> TrainConfig:
        """The `make run` preset; explicit overrides win."""
        return cls(**{**DEMO_PRESET, **overrides})

    @property
    def base_lr(self) -> float:
        """The head's learning rate: `lr`, else 1e-3 for AdamW and 1e-2 for SGD."""
        if self.lr is not None:
            return self.lr
        return 1e-2 if self.opt == "sgd" else 1e-3

    @property
    def resolved_ood_score(self) -> str:
        """`ood_score`, with `auto` = what the training taught: max-probability after outlier exposure, else energy.

        Outlier exposure trains outliers towards equal logits, which the max probability reads (1/C) but energy does
        not (logits all 5 are uniform yet as energetic as a confident answer): measured on the test fixture trained
        on negatives, max-probability flagged 40 of 40 held-out noise images, energy 0 of 40.
        """
        if self.ood_score != "auto":
            return self.ood_score
        return "max-probability" if self.outlier_exposure > 0 else DEFAULT_SCORE

    @property
    def checkpoint_path(self) -> str:
        """`checkpoint`, else <output stem>.ckpt next to the bundle."""
        return self.checkpoint or self._beside_output(CHECKPOINT_SUFFIX)

    @property
    def tensorboard_dir(self) -> str:
        """`log_dir`, else <output stem>.tb/ next to the bundle (beside its history files)."""
        return self.log_dir or self._beside_output(TENSORBOARD_SUFFIX)

    def _beside_output(self, suffix: str) -> str:
        output = Path(self.output)
        return str(output.with_name(output.stem + suffix))

    def with_changes(self, **changes) -> TrainConfig:
        """A validated copy with some settings changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain types, for the bundle, the checkpoint and the history file."""
        return asdict(self)


CHOICES = {
    "dataset": DATASETS,
    "augment": AUGMENTATIONS,
    "class_weights": CLASS_WEIGHTS,
    "strategy": STRATEGIES,
    "opt": OPTIMIZERS,
    "lr_scheduler": SCHEDULERS,
    "amp": AMP_CHOICES,
    "ood_score": ("auto", *SCORES),
}
# setting -> (lowest, highest) allowed; None = unbounded on that side.
RANGES = {
    "image_size": (16, None),
    "epochs": (1, None),
    "batch_size": (1, None),
    "workers": (0, None),
    "unfreeze_every": (1, None),
    "head_hidden": (0, None),
    "dropout": (0.0, 0.999),
    "mixup_alpha": (0.0, None),
    "cutmix_alpha": (0.0, None),
    "label_smoothing": (0.0, 0.999),
    "outlier_exposure": (0.0, None),
    "warmup_epochs": (0.0, None),
    "lr_step_size": (1, None),
    "plateau_patience": (0, None),
    "patience": (0, None),
    "weight_decay": (0.0, None),
    "momentum": (0.0, 1.0),
}


def _check_choices(config: TrainConfig) -> None:
    for name, choices in CHOICES.items():
        value = getattr(config, name)
        if value not in choices:
            raise SettingError(f"`{name}` {value!r} is invalid; valid choices: {', '.join(choices)}")


def _check_ranges(config: TrainConfig) -> None:
    for name, (low, high) in RANGES.items():
        value = getattr(config, name)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise SettingError(f"`{name}` must be {bounds}, got {value}")
    if not 0.0 < config.val_split < 1.0:
        raise SettingError(f"`val_split` must be in (0, 1), got {config.val_split}")
    if config.lr is not None and config.lr <= 0:
        raise SettingError(f"`lr` must be > 0, got {config.lr}")
    if config.outliers != SYNTHETIC and not Path(config.outliers).is_dir():
        raise SettingError(f"`outliers` must be {SYNTHETIC!r} or a folder of images, got {config.outliers!r}")


def setting_names() -> tuple[str, ...]:
    """Every TrainConfig field name."""
    return tuple(f.name for f in fields(TrainConfig))


def flag_message(message: str, names: tuple[str, ...] | None = None) -> str:
    """Library wording -> CLI wording: every `setting` named in backticks becomes its --flag."""
    known = set(names or setting_names())

    def flag(match: re.Match) -> str:
        name = match.group(1)
        return f"--{name.replace('_', '-')}" if name in known else match.group(0)

    return re.sub(r"`(\w+)`", flag, message)
