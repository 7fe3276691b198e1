"""Training-step and inference throughput of an architecture on random data (scripts/benchmark.py --mode model)."""

from __future__ import annotations

import time

import torch

from models.pet_classifier import PetClassifier
from models.runtime import Runtime, resolve_amp, resolve_device
from models.training.engine import make_scaler


def _rate(step, batch_size: int, seconds: float, sync) -> float:
    """Images/s of `step` over at least `seconds` (and 3 steps), after 2 unmeasured steps."""
    step(), step()
    sync()
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        step()
        count += 1
    sync()
    return round(batch_size * count / (time.perf_counter() - start), 1)


def model_throughput(
    arch: str, size: int, batch_size: int = 16, device: str = "auto", amp: str = "auto", seconds: float = 10.0
) -> dict:
    """Training-step (forward + backward + AdamW) and inference images/s of a fresh PetClassifier(arch)."""
    resolved = resolve_device(device)
    runtime = Runtime(resolved, amp=resolve_amp(amp, resolved), channels_last=resolved.type == "cuda")
    torch.manual_seed(0)
    model = runtime.place(PetClassifier(10, arch=arch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_scaler(runtime)
    images, labels = runtime.to_device(torch.randn(batch_size, 3, size, size), torch.randint(0, 10, (batch_size,)))

    def train_step():
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def infer_step():
        with torch.inference_mode(), runtime.autocast():
            model(images)

    model.train()
    train = _rate(train_step, batch_size, seconds, runtime.synchronize)
    model.eval()
    infer = _rate(infer_step, batch_size, seconds, runtime.synchronize)
    return {
        "arch": arch,
        "image_size": size,
        "batch_size": batch_size,
        "device": str(resolved),
        "amp": runtime.amp,
        "train_images_per_s": train,
        "inference_images_per_s": infer,
    }
