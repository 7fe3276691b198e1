"""The training and evaluation loops, shared by the trainer, evaluation and offline prediction."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from models.predictor import MemberOutput, Output, Predictor, concat, tta_views
from models.runtime import Runtime
from models.training.distributed import all_reduce_sum
from models.training.outliers import uniform_cross_entropy
from models.training.strategies import train_mode

# No tqdm monitor thread: every bar (disabled ones too) starts one if none runs, and it ends when no bar is left, so
# one started as an evaluation's bar is made, just before its DataLoader forks workers. A fork while another thread
# is being created can leave the child waiting forever on CPython's thread-state lock (seen under torchrun: the
# worker stuck in PyOS_AfterFork_Child -> _PyThreadState_DeleteExcept, the trainer waiting for its batch).
tqdm.monitor_interval = 0


def make_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 has float32's range)."""
    return torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp == "fp16")


def progress_enabled(is_main: bool) -> bool:
    """Progress bars only on the main process and only on a terminal."""
    return is_main and sys.stderr.isatty()


def bar(iterable, desc: str, enabled: bool):
    """A tqdm bar when enabled; the bare iterable otherwise."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not enabled)


@dataclass(frozen=True)
class Exposure:
    """Outlier exposure: a loader of outlier batches (at least one per training step) and the loss weight."""

    loader: Iterable
    weight: float


def _hard_labels(targets: torch.Tensor) -> torch.Tensor:
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def train_one_epoch(
    model, loader, criterion, optimizer, scaler, runtime: Runtime, schedule, epoch: int, mix=None, progress=False,
    exposure: Exposure | None = None,
):  # fmt: skip
    """One pass over `loader`; returns loss (the classification loss), acc, images and images/s over all processes.

    With `exposure`, every step also feeds a batch of its outliers through the same forward pass and adds
    `exposure.weight` times their cross-entropy from the uniform distribution (reported as `outlier_loss`).
    """
    train_mode(model)  # frozen batch-norm layers stay in eval mode
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, correct, images, outlier loss
    outliers, weight = (iter(exposure.loader), exposure.weight) if exposure is not None else (None, 0.0)
    runtime.synchronize()
    start = time.perf_counter()
    for step, (images, labels) in enumerate(bar(loader, f"epoch {epoch} train", progress)):
        schedule.apply(optimizer, epoch, step)
        images, labels = runtime.to_device(images, labels)
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        extra = runtime.to_device(next(outliers)[0]) if outliers is not None else None
        with runtime.autocast():
            logits = model(images if extra is None else torch.cat([images, extra]))
            logits, outlier_logits = logits[: len(images)], logits[len(images) :]
            class_loss = criterion(logits, targets)
            outlier_loss = uniform_cross_entropy(outlier_logits) if extra is not None else class_loss.new_zeros(())
            loss = class_loss + weight * outlier_loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        correct = (logits.argmax(dim=1) == _hard_labels(targets)).sum()
        size = totals.new_tensor(len(labels))
        totals += torch.stack(
            [class_loss.detach().double() * size, correct.double(), size, outlier_loss.detach() * size]
        )
    runtime.synchronize()
    seconds = time.perf_counter() - start
    loss_sum, correct, count, outlier_sum = all_reduce_sum(totals).tolist()
    count = max(count, 1.0)
    result = {"loss": loss_sum / count, "acc": correct / count, "images": int(count), "images_per_s": count / seconds}
    if exposure is not None:
        result["outlier_loss"] = outlier_sum / count
    return result


@torch.inference_mode()
def evaluate(
    model, loader, criterion, runtime: Runtime, num_classes: int, desc: str = "eval", progress: bool = False
) -> dict:
    """Loss, accuracy and confusion matrix (rows = true class, columns = predicted) over all processes."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, images
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=runtime.device)
    for images, labels in bar(loader, desc, progress):
        images, labels = runtime.to_device(images, labels)
        with runtime.autocast():
            logits = model(images)
        totals[0] += criterion(logits.float(), labels).double() * len(labels)
        totals[1] += len(labels)
        index = labels * num_classes + logits.argmax(dim=1)
        confusion += torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)
    loss_sum, count = all_reduce_sum(totals).tolist()
    confusion = all_reduce_sum(confusion).cpu()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc": confusion.diag().sum().item() / count, "confusion": confusion.tolist()}


def collect_outputs(
    predictor: Predictor, loader, tta: str = "none", features: bool = False, progress: bool = False
) -> tuple[list[list[MemberOutput]], torch.Tensor]:
    """Over the whole loader, per TTA view and per member: the logits (and features), plus the labels.

    One forward pass per member per view per batch; the results stay on the device for predictor.combine.
    """
    parts: list[list[list[MemberOutput]]] = []
    labels = []
    for images, targets in bar(loader, "evaluate", progress):
        parts.append([predictor.outputs(view, features) for view in tta_views(images, tta)])
        labels.append(targets)
    views = len(tta_views(torch.zeros(1, 1), tta))
    joined = [[_join([batch[v][m] for batch in parts]) for m in range(len(predictor.members))] for v in range(views)]
    return joined, (torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64))


def _join(outputs: list[MemberOutput]) -> MemberOutput:
    if not outputs:
        return MemberOutput(torch.empty(0, 0))
    features = None if outputs[0].features is None else torch.cat([o.features for o in outputs])
    return MemberOutput(torch.cat([o.logits for o in outputs]), features)


def predict_outputs(predictor: Predictor, loader, tta: str = "none", progress: bool = False) -> tuple[Output, list]:
    """The serving path's outputs (calibrated, averaged over views) for every batch, plus its second items."""
    outputs, extras = [], []
    for images, extra in bar(loader, "predict", progress):
        outputs.append(predictor.predict(images, tta))
        extras.extend(extra.tolist() if isinstance(extra, torch.Tensor) else extra)
    return concat(outputs), extras
