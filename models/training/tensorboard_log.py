"""TensorBoard events of a training run: per-epoch scalars, the final confusion matrix and reliability diagram as
images, and the run's settings with its final metrics (the HParams view). Only the main process writes.

`tensorboard` is a training dependency (requirements-dev.txt), not a serving one: without it, training goes on
and says once, at the start, that it writes no events.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from models.training.reporting import confusion_figure, reliability_figure

# history row key -> TensorBoard tag; every epoch, step = the epoch number.
SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "outlier_loss": "loss/outlier",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "images_per_s": "throughput/train_images_per_s",
    "time_s": "time/epoch_s",
}
LR_TAG = "lr/{}"  # one per optimizer parameter group, by the group's name (head, layer4, ...)
CONFUSION_TAG = "final/confusion_matrix"  # the best epoch's, on the validation images
RELIABILITY_TAG = "final/reliability"  # before and after the fitted temperature
METRIC_PREFIX = "hparams/"  # the final metrics the HParams view shows against the settings
INSTALL_HINT = "pip install tensorboard (requirements-dev.txt)"


class TrainingBoard:
    """Writes a run's events through torch's SummaryWriter; every method does nothing when it has no writer."""

    def __init__(self, writer=None):
        self.writer = writer

    @classmethod
    def open(cls, log_dir: str | Path, enabled: bool, purge_step: int, log: Callable[[str], None]) -> TrainingBoard:
        """A board writing to `log_dir` when `enabled` (the main process) and tensorboard is installed; else silent.

        `purge_step` (the first epoch this run trains) hides events a crashed or earlier run wrote from there on.
        """
        if not enabled:
            return cls()
        try:
            from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package
        except ImportError:
            log(f"TensorBoard: not installed, no events written ({INSTALL_HINT})")
            return cls()
        log(f"TensorBoard: events in {log_dir} (tensorboard --logdir {log_dir})")
        return cls(SummaryWriter(log_dir=str(log_dir), purge_step=purge_step))

    def epoch(self, row: dict, optimizer: torch.optim.Optimizer) -> None:
        """One epoch's history row (losses, accuracies, images/s, outlier loss) and every group's learning rate."""
        if self.writer is None:
            return
        step = row["epoch"]
        for key, tag in SCALARS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], step)
        for index, group in enumerate(optimizer.param_groups):
            self.writer.add_scalar(LR_TAG.format(group.get("name", f"group{index}")), group["lr"], step)
        self.writer.flush()  # watchable live, epoch by epoch

    def confusion(self, step: int, confusion: list[list[int]], class_names: list[str]) -> None:
        """The confusion matrix (rows true, columns predicted) as an image."""
        if self.writer is not None:
            self.writer.add_figure(CONFUSION_TAG, confusion_figure(confusion, class_names), step)

    def finish(self, step: int, settings: dict, metrics: dict, calibration: dict | None) -> None:
        """The reliability diagram (when calibrated) and the HParams entry: settings against final metrics."""
        if self.writer is None:
            return
        if calibration and "reliability_before" in calibration:
            figure = reliability_figure(calibration["reliability_before"], calibration["reliability_after"])
            self.writer.add_figure(RELIABILITY_TAG, figure, step)
        from torch.utils.tensorboard.summary import hparams

        values = {f"{METRIC_PREFIX}{name}": float(value) for name, value in metrics.items()}
        # Written into this run, not the timestamped sub-run SummaryWriter.add_hparams would make.
        for summary in hparams({k: _plain(v) for k, v in settings.items()}, values):
            self.writer.file_writer.add_summary(summary, step)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _plain(value):
    """HParams take numbers, strings and booleans: None and lists become strings."""
    return value if isinstance(value, bool | int | float | str) else str(value)
