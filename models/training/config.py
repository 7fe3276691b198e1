"""The training configuration: one frozen, validated value that drives the trainer, with or without a CLI.

Library errors name settings in backticks (`val_split`); `flag_message` turns them into the CLI's flags
(--val-split), so the same check reads right in a notebook and on the command line.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from models.ood import SCORES
from models.paths import DEFAULT_BUNDLE_PATH
from models.runtime import AMP_CHOICES
from models.settings import SettingError, between, declared, flag, one_of, optional, parsers, setting, text, validate
from models.training.ood import auto_score
from models.training.outliers import SYNTHETIC
from models.training.strategies import OPTIMIZERS, SCHEDULERS, STRATEGIES
from models.transforms import AUGMENTATIONS

DATASETS = ("folder", "oxford-pets")
CLASS_WEIGHTS = ("none", "balanced")
CHECKPOINT_SUFFIX = ".ckpt"
TENSORBOARD_SUFFIX = ".tb"

# `make run`: a model whose answers and unknown flag mean something, in about 10 CPU minutes on data/demo (1,200
# training images). The unknown flag needs the full 10 epochs and outlier exposure at weight 1.0: less data or a
# lower weight leaves noise and photos unflagged (the measurements: docs/experiments/demo-unknown-flag.md).
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


def default_workers() -> int:
    """Data-loader processes: up to 4, never more than the cores."""
    return min(4, os.cpu_count() or 1)


def _outliers(label: str, raw: object) -> str:
    value = str(raw)
    if value != SYNTHETIC and not Path(value).is_dir():
        raise SettingError(f"{label}={raw!r} is invalid: must be {SYNTHETIC!r} or a folder of images")
    return value


def _graphs(label: str, raw: object) -> str:
    value = str(raw).strip().lower()
    if value != "none" and (not value or set(value.split(",")) - {"fp32", "int8"}):
        raise SettingError(f"{label}={raw!r} is invalid: must be 'none' or a comma list of fp32, int8")
    return value


_path = optional(text)
_count = between(int, 0)
_fraction = between(float, 0.0, 0.999)
_positive = between(float, 0.0)


@declared
@dataclass(frozen=True)
class TrainConfig:
    """Every training setting, one line each: type, default, what is valid; field names are the CLI's flags."""

    # data
    data_dir: str | None = setting(None, _path)
    dataset: str = setting("folder", one_of(*DATASETS))
    dataset_root: str = setting("data/oxford-pets", text)
    val_split: float = setting(0.2, between(float, 0.0, 1.0, open_low=True, open_high=True))
    allow_overlap: bool = setting(False, flag)
    image_size: int = setting(224, between(int, 16))
    augment: str = setting("standard", one_of(*AUGMENTATIONS))
    mixup_alpha: float = setting(0.0, _positive)
    cutmix_alpha: float = setting(0.0, _positive)
    class_weights: str = setting("none", one_of(*CLASS_WEIGHTS))
    balanced_sampler: bool = setting(False, flag)
    workers: int = setting(default_workers(), _count)
    # model
    arch: str = setting("resnet50", text)
    weights: str = setting("imagenet", text)
    head_hidden: int = setting(512, _count)
    dropout: float = setting(0.5, _fraction)
    # optimisation
    strategy: str = setting("fine-tune", one_of(*STRATEGIES))
    unfreeze_every: int = setting(2, between(int, 1))
    epochs: int = setting(15, between(int, 1))
    batch_size: int = setting(32, between(int, 1))
    opt: str = setting("adamw", one_of(*OPTIMIZERS))
    lr: float | None = setting(None, optional(between(float, 0.0, open_low=True)))  # None: base_lr
    lr_mults: str = setting("auto", text)
    momentum: float = setting(0.9, between(float, 0.0, 1.0))
    weight_decay: float = setting(1e-4, _positive)
    lr_scheduler: str = setting("cosine", one_of(*SCHEDULERS))
    warmup_epochs: float = setting(1.0, _positive)
    lr_step_size: int = setting(5, between(int, 1))
    lr_gamma: float = setting(0.1, _positive)
    plateau_patience: int = setting(2, _count)
    label_smoothing: float = setting(0.1, _fraction)
    patience: int = setting(5, _count)
    # run
    output: str = setting(DEFAULT_BUNDLE_PATH, text)
    checkpoint: str | None = setting(None, _path)
    resume: str | None = setting(None, _path)
    device: str = setting("auto", text)
    amp: str = setting("auto", one_of(*AMP_CHOICES))
    sync_bn: bool = setting(False, flag)
    seed: int = setting(0, between(int))
    log_dir: str | None = setting(None, _path)
    # unknown inputs: outlier exposure while training, the detector fitted after it
    outlier_exposure: float = setting(0.0, _positive)
    outliers: str = setting(SYNTHETIC, _outliers)
    ood_score: str = setting("auto", one_of("auto", *SCORES))
    # what the bundle carries for ONNX Runtime: its graphs, int8 calibrated on training images (models/graphs.py)
    graphs: str = setting("fp32,int8", _graphs)

    def __post_init__(self):
        validate(self)

    @property
    def graph_precisions(self) -> tuple[str, ...]:
        """The graphs to write into the bundle after training, e.g. ('fp32', 'int8'); () for none."""
        return () if self.graphs == "none" else tuple(sorted(set(self.graphs.split(",")), key=("fp32", "int8").index))

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
        """`ood_score`, with `auto` = what the training taught (models.training.ood.auto_score)."""
        return auto_score(self.outlier_exposure) if self.ood_score == "auto" else self.ood_score

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

    def to_dict(self) -> dict:
        """Plain types, for the bundle, the checkpoint and the history file."""
        return asdict(self)


# Derived from the declarations, for the command line: setting -> its valid choices.
CHOICES = {name: parse.choices for name, parse in parsers(TrainConfig).items() if hasattr(parse, "choices")}


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
