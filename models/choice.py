"""Which runtime serves a member faster on this machine: each candidate timed on the same batch, the faster kept.

The order of PyTorch and ONNX Runtime is a property of the CPU, not of the model format: on a 2-core AVX-512/AMX
Xeon PyTorch's FX int8 ran ResNet-50 at 6.6 ms per image against ONNX Runtime's 8.3 (batch 16), while ONNX
Runtime's fp32 ran at 20 against PyTorch's 28; the same Xeon held to AVX2 ran ONNX Runtime faster at both (int8 50
against 41 img/s). So BACKEND=auto times both once per start-up, on the serving machine, with the threads the worker
uses (models/loader.py builds them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

TRIAL_BATCH = 16  # images per timed call: MAX_BATCH_SIZE's default; larger batches change ms/img little
BUDGET_S = 1.0  # timed calls of all candidates together stop after this, once each candidate ran MIN_ROUNDS times
MIN_ROUNDS, MAX_ROUNDS = 2, 10


@dataclass(frozen=True)
class Measured:
    """What the trial found: the faster backend, each candidate's best milliseconds per image, and the conditions."""

    backend: str
    ms_per_image: dict[str, float]
    batch: int
    threads: int
    seconds: float  # the whole trial, warm-up included

    def reason(self, precision: str) -> str:
        """One line for the log and GET /model: the figures and the choice."""
        figures = ", ".join(f"{name} {ms:.2f} ms per image" for name, ms in self.ms_per_image.items())
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{precision}: {figures} at batch {self.batch}, {threads} on this CPU -> {self.backend}"


def trial_images(batch: int, crop: int) -> torch.Tensor:
    """A fixed batch of normalised-looking images (what a forward pass costs does not depend on the pixels)."""
    return torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0))


def faster(
    candidates: Mapping[str, Callable[[torch.Tensor], object]], images: torch.Tensor, threads: int,
    budget_s: float = BUDGET_S,
) -> Measured:  # fmt: skip
    """Time every candidate on `images`: an untimed one-image call each, then alternating timed calls (MIN_ROUNDS
    to MAX_ROUNDS, about `budget_s` in all); the best call per candidate counts. Ties go to the first candidate."""
    if not candidates:
        raise ValueError("no candidates to measure")
    started = time.perf_counter()
    for run in candidates.values():
        run(images[:1])  # sessions, weights' layouts; what the full batch adds lazily, the first timed round pays
    best = {name: float("inf") for name in candidates}
    deadline = time.perf_counter() + budget_s
    for rounds in range(1, MAX_ROUNDS + 1):
        for name, run in candidates.items():
            call = time.perf_counter()
            run(images)
            best[name] = min(best[name], time.perf_counter() - call)
        if rounds >= MIN_ROUNDS and time.perf_counter() > deadline:
            break
    ms = {name: round(seconds * 1000 / len(images), 3) for name, seconds in best.items()}
    return Measured(min(ms, key=ms.get), ms, len(images), threads, round(time.perf_counter() - started, 2))
