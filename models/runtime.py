"""Where and how tensors are computed: device choice, mixed precision, memory format.

Training, evaluation, offline prediction and serving all place batches here; models.predictor turns
logits into calibrated probabilities for all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
import torch.nn.utils.fusion
from torch import nn

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU features that run bf16 matrix maths natively; without them oneDNN emulates bf16, many times slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class DeviceError(ValueError):
    """A device (or precision) that this machine cannot honour; the message says what to use instead."""


def resolve_device(spec: str = "auto", local_rank: int = 0, mps: bool = True) -> torch.device:
    """'auto' -> this process's GPU when CUDA is there, else mps (if `mps`), else cpu; DeviceError if `spec` can't run.

    Serving passes mps=False: it refuses DEVICE=mps (its path is tested on CPU and CUDA only), so auto must not
    pick it either; training, evaluation and prediction take mps, explicitly or by auto.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if mps and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
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


def cpu_features() -> Mapping[str, object]:
    """This CPU's feature flags: torch.cpu.get_capabilities() where torch has it (2.14+), else /proc/cpuinfo's."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return capabilities()
    return dict.fromkeys(kernel_cpu_flags(), True)


def kernel_cpu_flags() -> list[str]:
    """The `flags` line of /proc/cpuinfo: the kernel's names, its own ones too (e.g. cpuid_fault); [] elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return flags.partition(":")[2].split()


def cpu_bf16_problem(features: Mapping[str, object] | None = None) -> str | None:
    """None when the CPU (or `features`) runs bf16 natively (avx512_bf16 or AMX), else why not and what to use."""
    features = cpu_features() if features is None else features
    if any(features.get(flag) for flag in CPU_BF16_FLAGS):
        return None
    name = features.get("cpu_name") or "this CPU"
    return (
        f"{name} has neither avx512_bf16 nor AMX (amx_bf16), so bf16 would be emulated and far slower than fp32; "
        "use fp32 (or int8) on this CPU"
    )


def int8_engine_problem() -> str | None:
    """None when this torch build has the x86 quantized engine (FBGEMM/oneDNN) that int8 runs on, else why not."""
    if "x86" in torch.backends.quantized.supported_engines:
        return None
    return f"this torch build has no x86 quantized engine (it has {torch.backends.quantized.supported_engines})"


def precision_problem(precision: str, device: torch.device) -> str | None:
    """None when `device` runs PRECISION fp32/bf16/fp16/int8 well, else why not and what to use instead."""
    if precision == "fp32":
        return None
    if precision == "int8":
        if device.type != "cpu":
            return f"int8 runs on x86 CPUs only (FBGEMM/oneDNN): on {device.type} use fp16 or bf16, or set DEVICE=cpu"
        return int8_engine_problem()
    if device.type == "cpu":
        if precision == "bf16":
            return cpu_bf16_problem()
        return f"{precision} needs a CUDA device (on CPU: fp32, int8, or bf16 where the CPU has avx512_bf16 or AMX)"
    if device.type != "cuda":
        return f"{precision} is supported on CUDA and CPU devices only, not {device.type}"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16"
    return None


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


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d fed by a Conv2d alone into that convolution, in place; returns how many.

    The folded BatchNorm becomes nn.Identity, so the module tree (and e.g. the backbone/head split) stays as it
    was, and the outputs are equal to float rounding. A model torch.fx cannot trace is left as it is (0).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # tracing fails on data-dependent control flow: such a model simply runs unfolded
        return 0
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (
            isinstance(modules.get(node.target), nn.BatchNorm2d)
            and isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
            and len(source.users) == 1
        ):
            pairs.append((source.target, node.target))
    for conv_name, bn_name in pairs:
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(modules[conv_name], modules[bn_name])
        _replace(model, conv_name, fused.requires_grad_(modules[conv_name].weight.requires_grad))
        _replace(model, bn_name, nn.Identity())
    return len(pairs)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
