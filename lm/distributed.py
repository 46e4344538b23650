"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, DDP averages the
gradients (gloo on CPU, nccl on CUDA). `lm.train.fit` splits each step's batch between the ranks."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def init(rank: int, world_size: int, local_rank: int, device: str = "auto") -> torch.device | None:
    """Join the process group torchrun describes (MASTER_ADDR/PORT come from its environment); returns
    the device this rank trains on, or None for a single process (nothing to set up)."""
    if world_size <= 1:
        return None
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10)
    )
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
