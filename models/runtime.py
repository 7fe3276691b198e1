"""Where and how tensors are computed: device choice, mixed precision, memory format.

Training, evaluation, offline prediction and serving all place batches here; models.predictor turns
logits into calibrated probabilities for all of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device (or precision) that this machine cannot honour; the message says what to use instead."""


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU when CUDA is there, else mps, else cpu; raises DeviceError if `spec` can't run."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise DeviceError(f"{spec!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{spec} requested but CUDA is not available here; use auto or cpu")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        if device.index >= count:
            raise DeviceError(f"{spec} requested but only {count} CUDA device(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"{spec} requested but MPS is not available here; use auto or cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, none elsewhere; explicit values as given."""
    if amp not in AMP_CHOICES:
        raise DeviceError(f"unknown mixed precision {amp!r}; valid choices: {', '.join(AMP_CHOICES)}")
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass(frozen=True)
class Runtime:
    """How tensors are placed and computed: device, mixed precision (none/bf16/fp16), channels-last."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False

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

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device, in channels-last layout when asked."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=memory_format)

    def synchronize(self) -> None:
        """Wait for queued GPU work (timing, warm-up); a no-op on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def top_indices(probs: list[float], k: int) -> list[int]:
    """Indices of the k most probable classes, most probable first (ties: lower index first)."""
    return sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:k]


def top_k(probs: list[float], class_names: tuple[str, ...] | list[str], k: int) -> list[dict]:
    """The k most probable classes, most probable first, as [{"label", "probability"}] (ties: lower index first)."""
    return [{"label": class_names[i], "probability": probs[i]} for i in top_indices(probs, k)]
