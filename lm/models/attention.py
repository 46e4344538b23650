"""Causal self-attention, the layer every attention family is built from.

Reference: A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017, §3.2 (scaled dot-product attention,
multi-head attention); J. Ainslie et al., "GQA", 2023 (grouped-query attention). Inference can carry a
:class:`~lm.models.kv_cache.KVCache`: the layer then computes keys and values for the new tokens only and attends
over the cached ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.models.kv_cache import KVCache
from lm.models.positions import Rope, apply_rotary


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (Vaswani et al. 2017, §3.2) with nanoGPT's layout.

    ``c_attn`` stacks the query, key and value projections into one Linear(n_embd, 3*n_embd) (one matmul
    instead of three); ``c_proj`` is the output projection (``proj=False``: none, as the lecture's bare
    heads). Heads have size n_embd / n_head; ``F.scaled_dot_product_attention`` masks the upper triangle.

    With a :class:`KVCache`, ``x`` holds only the new positions: their keys/values are appended to the
    cache's layer ``layer`` and their queries attend over every cached position and the new ones up to
    themselves.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        *,
        n_kv_head: int | None = None,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        proj: bool = True,
        proj_bias: bool = True,
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_kv_head ({n_kv_head}) must divide n_head ({n_head})")
        self.n_embd, self.n_head, self.n_kv_head, self.dropout = n_embd, n_head, n_kv_head, dropout
        self.head_size = n_embd // n_head
        # Rows: n_head query heads, then n_kv_head key heads, then n_kv_head value heads (3·n_embd without GQA).
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_size, bias=qkv_bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=proj_bias) if proj else None
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)  # (B, T, (nh+2nkv)hs) -> q, k, v
        # Split channels into heads and move heads next to batch so each head attends alone.
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:  # rotary: rotate queries and keys by their positions' angles (keys cached rotated)
            q, k = apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)
        dropout_p = self.dropout if self.training else 0.0
        sdpa = _sdpa if nkv == nh else _sdpa_grouped
        # Uncached: causal, or the sliding-window band when a rotary model reads more than block_size tokens.
        causal = {"is_causal": True} if rope is None or rope.band is None else {"attn_mask": rope.band}
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and cache is None:
            # torch 2.13's CPU flash-attention backward is much slower in bf16 than in fp32 (docs/performance.md),
            # so under CPU autocast attention runs in fp32; the matmuls around it keep their bf16 speed-up.
            with torch.autocast("cpu", enabled=False):
                y = sdpa(q.float(), k.float(), v.float(), dropout_p=dropout_p, **causal)
        elif cache is None or cache.length == 0:
            if cache is not None:
                cache.update(layer, k, v)  # a prefill: the new tokens are the whole window
            y = sdpa(q, k, v, dropout_p=dropout_p, **causal)  # (B, nh, T, hs)
        else:
            start, window = cache.length, cache.window
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs): the visible cached positions, then the new ones
            # New query i sits at cache position start+i and sees keys start+i-window+1 .. start+i. A single new
            # token sees all S returned (no mask); is_causal would align the triangle top-left, so build it.
            mask = None
            if T > 1:
                q_pos = torch.arange(start, start + T, device=x.device)[:, None]  # (T, 1)
                k_pos = torch.arange(start + T - k.size(2), start + T, device=x.device)[None, :]  # (1, S)
                mask = (k_pos <= q_pos) & (k_pos > q_pos - window)  # (T, S)
            y = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, nh, T, hs)
        # Concatenate the heads' outputs side by side again.
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, nh*hs)
        if self.c_proj is not None:
            y = self.resid_dropout(self.c_proj(y))
        return y


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, **kw)  # (B, nh, T, hs)


def _sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    # Grouped-query attention: key/value head j serves query heads j·g .. j·g+g-1 (g = nh / nkv), the layout of
    # LLaMA's repeat_kv. Repeating them here keeps the KV cache at nkv heads, which is what GQA saves.
    g = q.size(1) // k.size(1)
    k = k.repeat_interleave(g, dim=1)  # (B, nkv, S, hs) -> (B, nh, S, hs)
    v = v.repeat_interleave(g, dim=1)  # (B, nkv, S, hs) -> (B, nh, S, hs)
    return F.scaled_dot_product_attention(q, k, v, **kw)  # (B, nh, T, hs)
