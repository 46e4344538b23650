"""Pieces shared by every model family: the loss and the fixed-context windows.

Kept in its own module (not in ``lm.models.__init__``) so the family modules can import it
without a circular import through the registry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1
"""Target id of padding positions; they are left out of the loss (and its mean)."""


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean next-token cross-entropy (nats) over every position whose target is not -1.

    ``logits`` is (B, T, V), ``targets`` (B, T). None when there are no targets. If *every*
    target is -1 the mean is over zero positions and the result is NaN (as PyTorch's own
    ``cross_entropy``); callers never score an all-padding batch.
    """
    if targets is None:
        return None
    B, T, V = logits.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets must have shape {(B, T)} to match idx, got {tuple(targets.shape)}")
    # cross_entropy wants classes on dim 1: flatten the positions into one batch.
    return F.cross_entropy(
        logits.reshape(B * T, V),  # (B*T, V)
        targets.reshape(B * T),  # (B*T,)
        ignore_index=IGNORE_INDEX,
    )


def check_idx(idx: torch.Tensor) -> tuple[int, int]:
    """Validate token ids as a 2-D (B, T) integer tensor and return (B, T)."""
    if idx.dim() != 2:
        raise ValueError(f"idx must be a 2-D (batch, time) tensor of token ids, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must hold integer token ids (int64), got {idx.dtype}")
    return idx.shape[0], idx.shape[1]


def causal_windows(idx: torch.Tensor, k: int, pad_id: int = 0) -> torch.Tensor:
    """For every position t, the k token ids idx[:, t-k+1 .. t] (oldest first).

    Positions before the start of the sequence are filled with ``pad_id`` (0: on the names
    corpus that is the '.' boundary token, so this reproduces makemore's "..." context).
    Returns (B, T, k); a view of the padded ids, so it costs one (B, T+k-1) copy, not B*T*k.
    """
    # (B, T) -> (B, k-1+T): k-1 pad ids on the left so the first position has a full window.
    padded = F.pad(idx, (k - 1, 0), value=pad_id)
    # unfold(dim=1, size=k, step=1): (B, k-1+T) -> (B, T, k); window t ends at original position t.
    return padded.unfold(1, k, 1)
