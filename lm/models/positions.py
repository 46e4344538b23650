"""Where a token is: fixed sinusoidal position encodings (added to the embeddings) and rotary position embeddings
(applied to queries and keys in every attention layer).

References: A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017, §3.5 (sinusoids); J. Su et al.,
"RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021, §3.4 (rotary).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position encodings (Vaswani et al. 2017, §3.5): a buffer, no parameters.

    PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)). The buffer is not
    persistent (not in the state dict): it is a pure function of (block_size, n_embd).
    """

    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        pos = torch.arange(block_size, dtype=torch.float32).unsqueeze(1)  # (block_size, 1)
        freq = torch.exp(
            torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd)
        )  # (ceil(d/2),)
        table = torch.zeros(block_size, n_embd)
        table[:, 0::2] = torch.sin(pos * freq)  # even channels
        table[:, 1::2] = torch.cos(pos * freq[: n_embd // 2])  # odd channels (one fewer if d is odd)
        self.register_buffer("table", table, persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.table[pos]  # (T,) -> (T, n_embd)


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021, 'RoFormer', §3.4), in the half-rotation layout of LLaMA's
    Hugging Face port (GPT-NeoX): channel i of a head is paired with channel i + hs/2, and the pair at position p
    is rotated by the angle p·θ_i, θ_i = base^(-2i/hs).

    Queries and keys are rotated, not the embeddings, so a score q_t·k_s depends on the positions only through
    t - s: shifting every position leaves every score unchanged (tests check it). ``cos``/``sin`` are computed
    for the positions asked, so no table limits how far generation may go.
    """

    def __init__(self, head_size: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # a function of (head_size, base)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every (position, channel) angle: (T,) positions -> 2 x (T, hs)."""
        angles = pos.float()[:, None] * self.inv_freq[None, :]  # (T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, hs): channel i and i + hs/2 share an angle
        return angles.cos(), angles.sin()


class Rope(NamedTuple):
    """What every attention layer of a rotary model needs about positions in one forward pass."""

    cos: torch.Tensor
    """(T, hs) cosines of the new tokens' angles."""
    sin: torch.Tensor
    """(T, hs) sines."""
    band: torch.Tensor | None = None
    """(T, T) boolean mask of a sliding-window pass (query i sees keys i-block_size+1 .. i), used when an uncached
    input is longer than block_size; None: plain causal."""


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + hs/2) channel pair of ``x`` (B, nh, T, hs) by its angle (cos, sin: (T, hs))."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, nh, T, hs): the pair (a, b) -> (-b, a), a quarter turn
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)  # in x's dtype (bf16 under autocast), as HF Llama
