"""Causal self-attention and the frame of every attention family; the two bare attention models.

References: A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (scaled dot-product attention,
multi-head attention, sinusoidal positions); A. Radford et al., "Language Models are Unsupervised Multitask
Learners", 2019 (GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2*n_layer)).

Inference can carry a :class:`KVCache` (``model(idx, cache=cache)``): each attention layer then computes keys
and values for the new tokens only and attends over the cached ones, so sampling costs one token's work per
step instead of a whole window's (see :func:`lm.generate.stream`).

Module names follow nanoGPT (``transformer.wte``, ``transformer.wpe``, ``attn.c_attn``, ``attn.c_proj``,
``lm_head``) in every attention family, so checkpoints read alike and one component map serves them all.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.config import MultiHeadConfig, SingleHeadConfig
from lm.models.base import LanguageModel, check_idx, lm_loss

INIT_STD = 0.02
"""GPT-2's init: every Linear and Embedding weight ~ N(0, 0.02²), biases 0 (Radford et al. 2019)."""

HEAD_LOGIT_STD = 0.3
"""Cap on the initial std of an untied LM head's logits (see :meth:`CausalLM._init_weights`)."""


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
            # torch 2.13's CPU flash-attention backward is ~9x slower in bf16 than in fp32 (measured
            # with bench/train.py), so under CPU autocast attention runs in fp32; the matmuls
            # around it keep their bf16 speed-up.
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


class CausalLM(LanguageModel):
    """Shared frame of the attention families: token + position embeddings → body → LM head.

    Subclasses add their body modules to ``self.transformer``, implement :meth:`body` and call
    :meth:`_init_weights` last.
    The input may be any length T <= ``block_size`` (the position table has ``block_size``
    rows); longer inputs raise ValueError, so callers crop the context when sampling.

    ``forward(idx, targets, cache=...)`` with a :class:`KVCache` from :meth:`new_cache` is the
    incremental path for sampling: ``idx`` holds only the tokens not yet cached, they get
    positions ``cache.length ..``, and the cache grows by T (cache.length + T <= block_size).
    """

    kv_cache = True
    components = {
        "wte": "token_embedding",
        "wpe": "position_embedding",
        "attn": "attention",
        "mlp": "feed_forward",
        "ln_1": "norm",
        "ln_2": "norm",
        "ln_f": "norm",
        "lm_head": "head",
    }

    def __init__(self, cfg, vocab_size: int, *, pos: str = "learned", dropout: float = 0.0, head_bias: bool = True):
        super().__init__(cfg, vocab_size)
        block_size, n_embd = cfg.block_size, cfg.n_embd
        self.n_embd = n_embd
        # wte is registered first so that, when tied, named_parameters() reports the shared
        # matrix once, as transformer.wte.weight (a token embedding).
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab_size, n_embd)))
        self.rotary: Rotary | None = None
        if pos == "learned":
            self.transformer["wpe"] = nn.Embedding(block_size, n_embd)
        elif pos == "sinusoidal":
            self.transformer["wpe"] = SinusoidalPositions(block_size, n_embd)
        elif pos == "rope":  # no table: positions rotate queries and keys inside attention
            self.rotary = Rotary(n_embd // cfg.n_head, cfg.rope_base)
        else:
            raise ValueError(f"pos must be 'learned', 'sinusoidal' or 'rope', got {pos!r}")
        self.transformer["drop"] = nn.Dropout(dropout)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=head_bias)
        self.tied = False

    def tie_weights(self) -> None:
        """Share the LM head weight with the token embedding (Press & Wolf 2017), as nanoGPT."""
        self.transformer.wte.weight = self.lm_head.weight
        self.tied = True

    def body(self, x: torch.Tensor, cache: KVCache | None = None, rope: Rope | None = None) -> torch.Tensor:
        raise NotImplementedError  # (B, T, C) -> (B, T, C)

    @property
    def rolls(self) -> bool:
        """Whether generation can slide the KV cache instead of refilling it: with rotary positions a cached key
        keeps its meaning when older ones are dropped, since scores depend on relative positions only."""
        return self.rotary is not None

    def receptive_field(self) -> int:
        """Tokens that can reach the last prediction when every layer attends to its last block_size positions
        (a rotary model reading more than block_size tokens): n_layer · (block_size - 1) + 1."""
        n_layer = sum(isinstance(m, CausalSelfAttention) for m in self.modules())
        return n_layer * (self.block_size - 1) + 1

    def residual_projections(self) -> list[nn.Linear]:
        """The Linears whose outputs are added to a residual stream (none without residual blocks)."""
        return []

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty :class:`KVCache` for this model (one layer per attention module), on its device and dtype."""
        attns = [m for m in self.modules() if isinstance(m, CausalSelfAttention)]
        w = self.lm_head.weight
        return KVCache(
            len(attns),
            batch_size,
            attns[0].n_kv_head,
            attns[0].head_size,
            2 * self.block_size if self.rolls else self.block_size,  # rolling: compact once per window
            device=w.device,
            dtype=w.dtype,
            window=self.block_size,
        )

    @torch.no_grad()
    def _init_weights(self, n_layer: int) -> None:
        """GPT-2 init (Radford et al. 2019; nanoGPT), deterministic given the torch seed.

        Linear and Embedding weights ~ N(0, 0.02²), biases 0, LayerNorm/RMSNorm gain 1 / shift 0.
        Residual output projections (``c_proj`` inside blocks) ~ N(0, (0.02/sqrt(2*n_layer))²),
        because each block adds two of them to the residual stream and its variance would
        otherwise grow with depth.

        An *untied* LM head gets std min(0.02, 0.3/sqrt(n_embd)): its input is LayerNorm'd
        (unit variance per channel), so each initial logit has std 0.02*sqrt(n_embd) (0.39 at
        384, 0.55 at 768). Random logits of std s cost about s²/2 nats above ln V at init
        (0.15 at 768); capping s at 0.3 keeps the initial loss within ~0.05 of ln V at any
        width, and equals GPT-2's 0.02 for n_embd <= 225. A tied head is the token embedding,
        which keeps GPT-2's 0.02.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:  # RMSNorm has no shift
                    nn.init.zeros_(module.bias)
        for proj in self.residual_projections():
            nn.init.normal_(proj.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * n_layer))
        if not self.tied:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=min(INIT_STD, HEAD_LOGIT_STD / math.sqrt(self.n_embd)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None):
        B, T = check_idx(idx)
        start = 0 if cache is None else cache.length
        band = None
        if cache is None and T > self.block_size and self.rolls:
            # A rotary model reads any length as sliding-window attention (what a rolled cache computes).
            band = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril().triu(-(self.block_size - 1))
        elif start + T > (self.block_size if cache is None else cache.max_len):
            if cache is None:
                raise ValueError(
                    f"sequence length {T} exceeds block_size {self.block_size}; "
                    f"crop the context to its last {self.block_size} tokens"
                )
            raise ValueError(
                f"the KV cache holds {start} positions and {T} more exceed block_size {self.block_size}; "
                f"reset it and refill it from a cropped window (as lm.generate.stream does)"
            )
        first = start if cache is None else cache.offset + start  # absolute position of idx[:, 0]
        pos = torch.arange(first, first + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.rotary is None:
            x = x + self.transformer.wpe(pos)  # (T, C) position embeddings, broadcast over the batch
        else:
            rope = Rope(*self.rotary(pos), band)  # cos, sin (T, hs): applied to queries and keys in every layer
        x = self.transformer.drop(x)  # (B, T, C)
        x = self.body(x, cache, rope)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(x)  # (B, T, V)
        return logits, lm_loss(logits, targets)


class SingleHead(CausalLM):
    """Token + position embeddings → one causal self-attention head of size n_embd → LM head.

    The lecture's ``Head``: key, query and value Linear(n_embd, n_embd) without bias (here
    stacked as ``transformer.attn.c_attn``), no output projection, no residual, no norm.
    Parameters: V*C + block_size*C + 3*C² + C*V + V.
    """

    Config = SingleHeadConfig

    def __init__(self, cfg: SingleHeadConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, head_bias=True)
        self.transformer["attn"] = CausalSelfAttention(cfg.n_embd, 1, qkv_bias=False, proj=False)
        self._init_weights(n_layer=1)

    def body(self, x: torch.Tensor, cache: KVCache | None = None, rope: Rope | None = None) -> torch.Tensor:
        return self.transformer.attn(x, cache, 0, rope)  # (B, T, C)


class MultiHead(CausalLM):
    """Token + position embeddings → n_head causal heads of size n_embd/n_head, concatenated →
    output projection Linear(n_embd, n_embd) → LM head (no residual, no norm yet)."""

    Config = MultiHeadConfig

    def __init__(self, cfg: MultiHeadConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, head_bias=True)
        self.transformer["attn"] = CausalSelfAttention(
            cfg.n_embd, cfg.n_head, qkv_bias=False, proj=True, proj_bias=True
        )
        self._init_weights(n_layer=1)

    def body(self, x: torch.Tensor, cache: KVCache | None = None, rope: Rope | None = None) -> torch.Tensor:
        return self.transformer.attn(x, cache, 0, rope)  # (B, T, C)
