"""The two bare attention families of the bigram-to-transformer lectures: one causal self-attention head, and
several heads concatenated with an output projection (no residual, no norm, no feed-forward yet)."""

from __future__ import annotations

import torch

from lm.families import MultiHeadConfig, SingleHeadConfig
from lm.models.attention import CausalSelfAttention
from lm.models.causal_lm import CausalLM
from lm.models.kv_cache import KVCache
from lm.models.positions import Rope


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
