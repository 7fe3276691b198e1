"""The training and evaluation loops, shared by scripts/train.py, scripts/evaluate.py and scripts/predict.py."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from models.distributed import all_reduce_sum

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """How tensors are placed and computed: device, mixed precision, memory format, progress bars."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    progress: bool = False

    def autocast(self):
        """Autocast for bf16/fp16, else a null context."""
        if self.amp not in AMP_DTYPES:
            return contextlib.nullcontext()
        return torch.amp.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def to_device(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """Move a batch to the device (asynchronously from pinned memory), channels_last when asked."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        return images if labels is None else (images, labels.to(self.device, non_blocking=True))

    def bar(self, iterable, desc: str):
        """A tqdm bar on the main process's terminal; the bare iterable otherwise."""
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not self.progress)


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, none on CPU; explicit values as given."""
    if amp != "auto":
        if amp not in AMP_CHOICES:
            raise ValueError(f"unknown --amp {amp!r}; valid choices: {', '.join(AMP_CHOICES)}")
        return amp
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 has float32's range)."""
    return torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp == "fp16")


def progress_enabled(is_main: bool) -> bool:
    """Progress bars only on the main process and only on a terminal."""
    return is_main and sys.stderr.isatty()


def _hard_labels(targets: torch.Tensor) -> torch.Tensor:
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(model, loader, criterion, optimizer, scaler, runtime: Runtime, schedule, epoch: int, mix=None):
    """One pass over `loader`; returns loss, acc, images and images/s summed over all processes."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # loss sum, correct, images
    _sync(runtime.device)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(runtime.bar(loader, f"epoch {epoch} train")):
        schedule.apply(optimizer, epoch, step)
        images, labels = runtime.to_device(images, labels)
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        with runtime.autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        correct = (logits.argmax(dim=1) == _hard_labels(targets)).sum()
        totals += torch.stack([loss.detach().double() * len(labels), correct.double(), totals.new_tensor(len(labels))])
    _sync(runtime.device)
    seconds = time.perf_counter() - start
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc": correct / count, "images": int(count), "images_per_s": count / seconds}


@torch.inference_mode()
def evaluate(model, loader, criterion, runtime: Runtime, num_classes: int, desc: str = "eval") -> dict:
    """Loss, accuracy and confusion matrix (rows = true class, columns = predicted) over all processes."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, images
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=runtime.device)
    for images, labels in runtime.bar(loader, desc):
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


@torch.inference_mode()
def predict_probs(model: nn.Module, loader, runtime: Runtime) -> tuple[torch.Tensor, list]:
    """Softmax probabilities (float32, CPU) for every batch the loader yields, in order, plus its second items."""
    model.eval()
    outputs, extras = [], []
    for images, extra in runtime.bar(loader, "predict"):
        with runtime.autocast():
            logits = model(runtime.to_device(images))
        outputs.append(logits.float().softmax(dim=1).cpu())
        extras.extend(extra.tolist() if isinstance(extra, torch.Tensor) else extra)
    return (torch.cat(outputs) if outputs else torch.empty(0)), extras
