"""torchrun-driven distributed set-up; a single process when launched without torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process runs and which part of the job it is."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when launched by torchrun with more than one process."""
        return self.world_size > 1


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group when there are several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place); a no-op in a single process."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every process; the object itself in a single process."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (batch-norm running statistics) to every process; a no-op in a single process."""
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)
