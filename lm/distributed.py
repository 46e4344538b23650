"""Where a run computes: the device, and data-parallel processes on PyTorch's own engine (torchrun starts
the processes, DDP averages the gradients: gloo on CPU, nccl on CUDA; `lm.trainer.fit` splits each step's
batch between the ranks)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def pick_device(name: str) -> torch.device:
    """'auto' → cuda, then mps, then cpu; an explicit device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available: set it to 'auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but MPS is not available: use 'auto' or 'cpu'")
    return torch.device(name)


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
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many processes train together (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
