"""The frame every attention family shares: token + position embeddings → body → LM head, GPT-2's init, and the
generation cache.

Reference: A. Radford et al., "Language Models are Unsupervised Multitask Learners", 2019 (GPT-2 init: N(0, 0.02),
residual projections scaled by 1/sqrt(2*n_layer)); O. Press, L. Wolf, "Using the Output Embedding to Improve
Language Models", EACL 2017 (weight tying).

Module names follow nanoGPT (``transformer.wte``, ``transformer.wpe``, ``attn.c_attn``, ``attn.c_proj``,
``lm_head``) in every attention family, so checkpoints read alike and one component map serves them all.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lm.models.attention import CausalSelfAttention
from lm.models.base import LanguageModel, check_idx, lm_loss
from lm.models.kv_cache import KVCache
from lm.models.positions import Rope, Rotary, SinusoidalPositions

INIT_STD = 0.02
"""GPT-2's init: every Linear and Embedding weight ~ N(0, 0.02²), biases 0 (Radford et al. 2019)."""

HEAD_LOGIT_STD = 0.3
"""Cap on the initial std of an untied LM head's logits (see :meth:`CausalLM._init_weights`)."""


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
