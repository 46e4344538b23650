"""The KV cache of incremental decoding: each attention layer's keys and values of the positions seen so far, so
sampling computes one new token's keys and values per step instead of a whole window's (see
:func:`lm.generate.stream`)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer for the positions processed so far (inference).

    Preallocated as two (n_layer, B, n_kv_head, max_len, head_size) tensors, of which the first
    ``length`` positions are filled. A forward pass with a cache feeds only the new tokens: each
    layer writes their keys/values at positions ``length .. length+T-1`` (:meth:`update`) and
    their queries attend over everything cached so far; the model then calls :meth:`advance`.

    With learned or sinusoidal positions, positions are absolute: the token at cache position p got
    position embedding p. So ``max_len`` is the model's ``block_size`` (a learned position table has
    no row beyond it), and such a cache cannot roll: shifting the window would change every cached
    token's position, hence its keys and values in every layer above the first. A caller whose
    sequence outgrows the window calls :meth:`reset` and refills the cache from a cropped window.
    Rotary models can :meth:`roll` instead (their scores depend on relative positions only).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        window: int | None = None,
    ):
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.window = window or max_len
        """Keys a query sees: itself and the window - 1 before it (rolling caches hold more than a window)."""
        self.length = 0
        """Positions filled (the same for every layer between forward passes)."""
        self.offset = 0
        """Positions dropped from the front by :meth:`roll`: the first cached token's absolute position."""

    def reset(self) -> None:
        """Forget every position (the buffers are reused, not reallocated)."""
        self.length = self.offset = 0

    def roll(self, n: int) -> None:
        """Drop the ``n`` oldest positions of every layer (rotary models only, see ``CausalLM.rolls``): the rest
        move to the front, keeping the keys they were rotated with, and new tokens continue at absolute
        position ``offset + length``. A rolling cache holds two windows, so this copy happens once per
        window of generated tokens, not once per token."""
        keep = self.length - n
        self.k[:, :, :, :keep] = self.k[:, :, :, n : self.length].clone()
        self.v[:, :, :, :keep] = self.v[:, :, :, n : self.length].clone()
        self.length, self.offset = keep, self.offset + n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's keys/values of T new positions; return that layer's keys/values that the new
        queries can see: from window - 1 before the first new position (or the start) to the last new one.

        ``k``, ``v``: (B, n_head, T, head_size) → both returned as (B, n_head, S, head_size), S <= length+T.
        """
        T = k.size(2)
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {start} of {self.max_len} positions; {T} more do not fit")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        lo = max(0, start - self.window + 1)
        return self.k[layer, :, :, lo:end], self.v[layer, :, :, lo:end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called once per forward pass, after every layer)."""
        self.length += n
