"""A decoder-only transformer in the shape of nanoGPT's ``model.py`` (GPT-2 style), and the one-block model.

References: A. Radford, J. Wu, R. Child, D. Luan, D. Amodei, I. Sutskever, "Language Models are
Unsupervised Multitask Learners", 2019 (GPT-2: decoder-only, pre-norm, final LayerNorm); A. Vaswani et
al., "Attention Is All You Need", NeurIPS 2017 (the post-norm block); J. L. Ba, J. R. Kiros, G. E.
Hinton, "Layer Normalization", 2016; O. Press, L. Wolf, "Using the Output Embedding to Improve Language
Models", EACL 2017 (weight tying).

Parameter names are nanoGPT's: ``transformer.wte``, ``transformer.wpe``, ``transformer.h.{i}`` (``ln_1``,
``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), ``transformer.ln_f``, ``lm_head``.

Parameter counts are checked against their published values (lm/references.py) by ``lm params``' reference
configurations: the Language modeling journey's Shakespeare GPT, GPT-2 small to XL, Llama 3.2 1B and Llama 2 7B.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lm.families import BlockConfig, GPTConfig, LlamaConfig
from lm.models.attention import CausalSelfAttention
from lm.models.causal_lm import CausalLM
from lm.models.kv_cache import KVCache
from lm.models.positions import Rope


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(C, H) → GELU → Linear(H, C) → dropout (Vaswani et al. 2017, §3.3;
    GPT-2: H = 4C)."""

    def __init__(self, n_embd: int, n_hidden: int | None = None, *, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        n_hidden = n_hidden or 4 * n_embd
        self.c_fc = nn.Linear(n_embd, n_hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(n_hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, H) -> (B, T, C)


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020, 'GLU Variants Improve Transformer'; LLaMA's):
    c_proj(silu(c_gate(x)) * c_fc(x)) → dropout. Three matrices instead of two, so LLaMA narrows the hidden
    width to about 2/3 of 4C to keep the cost (:attr:`lm.families.GPTConfig.hidden`)."""

    def __init__(self, n_embd: int, n_hidden: int, *, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.c_gate = nn.Linear(n_embd, n_hidden, bias=bias)  # Hugging Face Llama: gate_proj
        self.c_fc = nn.Linear(n_embd, n_hidden, bias=bias)  # up_proj
        self.c_proj = nn.Linear(n_hidden, n_embd, bias=bias)  # down_proj
        self.silu = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.silu(self.c_gate(x)) * self.c_fc(x)  # (B, T, C) -> (B, T, H): the gate scales each hidden unit
        return self.dropout(self.c_proj(h))  # (B, T, H) -> (B, T, C)


def norm_layer(cfg: GPTConfig) -> nn.Module:
    """The model's norm: LayerNorm (with a shift when ``bias``) or RMSNorm (Zhang & Sennrich 2019: x / rms(x) · g,
    no mean subtraction and no shift; cheaper, and what LLaMA uses)."""
    if cfg.norm_class == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Transformer block: attention and feed-forward sublayers, each with a residual and a norm.

    ``norm='pre'`` (GPT-2, LLaMA): x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). The residual stream is
    never normalised, so the model needs a final norm (``ln_f``) before the head.
    ``norm='post'`` (Vaswani et al. 2017, as LLMfromScratch): x = ln_1(x + attn(x)); x = ln_2(x + mlp(x)).
    The output is already normalised, so no ``ln_f``.

    The config's switches pick each piece: ``norm_class`` (LayerNorm | RMSNorm), ``mlp`` (GELU | SwiGLU, of
    width ``hidden``), ``bias``, ``n_kv_head`` (grouped-query attention); rotary positions arrive as ``rope``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm = cfg.norm
        self.ln_1 = norm_layer(cfg)
        self.attn = CausalSelfAttention(
            cfg.n_embd,
            cfg.n_head,
            n_kv_head=cfg.kv_heads,
            dropout=cfg.dropout,
            qkv_bias=cfg.qkv_bias,
            proj=True,
            proj_bias=cfg.bias,
        )
        self.ln_2 = norm_layer(cfg)
        if cfg.mlp == "swiglu":
            self.mlp: nn.Module = SwiGLU(cfg.n_embd, cfg.hidden, dropout=cfg.dropout, bias=cfg.bias)
        else:
            self.mlp = FeedForward(cfg.n_embd, cfg.hidden, dropout=cfg.dropout, bias=cfg.bias)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope: Rope | None = None
    ) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.norm == "pre":
            x = x + self.attn(self.ln_1(x), cache, layer, rope)
            x = x + self.mlp(self.ln_2(x))
        else:
            x = self.ln_1(x + self.attn(x, cache, layer, rope))
            x = self.ln_2(x + self.mlp(x))
        return x


class GPT(CausalLM):
    """Token + position embeddings → ``n_layer`` transformer :class:`Block` s → final LayerNorm → LM head.

    Config fields: ``n_layer``, ``n_head``, ``n_embd``, ``block_size``, ``dropout`` (embeddings, attention
    weights, residual branches; training only), ``bias`` (attention output projection, feed-forward Linears,
    LayerNorms), ``qkv_bias`` (``c_attn``), ``head_bias`` (``lm_head``), ``tie_weights`` (``lm_head.weight`` is
    ``transformer.wte.weight``), ``pos`` (``learned`` table or fixed ``sinusoidal`` buffer), ``norm`` (``pre``:
    GPT-2, with ``ln_f``; ``post``: LayerNorm after each residual add, so no ``ln_f``).

    Init: GPT-2's (:meth:`lm.models.causal_lm.CausalLM._init_weights`), with the untied LM head's std capped
    so the initial loss stays within ~0.05 nats of ln V.
    """

    Config = GPTConfig

    def __init__(self, cfg: GPTConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, pos=cfg.pos, dropout=cfg.dropout, head_bias=cfg.head_bias)
        self.transformer["h"] = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = cfg.norm == "pre"  # a plain bool, so forward has no dict lookups to trace
        if self.final_norm:
            self.transformer["ln_f"] = norm_layer(cfg)
        if cfg.tie_weights:
            self.tie_weights()
        self._init_weights(n_layer=cfg.n_layer)

    def body(self, x: torch.Tensor, cache: KVCache | None = None, rope: Rope | None = None) -> torch.Tensor:
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, rope)  # (B, T, C)
        if self.final_norm:
            x = self.transformer.ln_f(x)  # (B, T, C)
        return x

    def residual_projections(self) -> list[nn.Linear]:
        # Each block adds two projections to the residual stream (GPT-2 scales their init by 1/sqrt(2*n_layer)).
        return [proj for block in self.transformer.h for proj in (block.attn.c_proj, block.mlp.c_proj)]


class BlockLM(GPT):
    """Embeddings → one transformer :class:`Block` (``norm`` pre or post) → [final LayerNorm if pre] → LM head.

    The lecture's block is a one-layer GPT with fixed settings: bias-free query/key/value, biases in the
    projections, the feed-forward, the LayerNorms and the LM head; learned positions; an untied head.
    """

    Config = BlockConfig

    def __init__(self, cfg: BlockConfig, vocab_size: int):
        as_gpt = GPTConfig(**cfg.model_dump(exclude={"family"}), family="gpt", n_layer=1, head_bias=True)
        super().__init__(as_gpt, vocab_size)
        self.cfg = cfg


class Llama(GPT):
    """LLaMA (H. Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023; "Llama 2", 2023):
    the GPT of this file with LLaMA's switches fixed: RMSNorm before each sublayer and before the head, rotary
    positions (no position table), a SwiGLU feed-forward, no biases, grouped-query attention when
    ``n_kv_head`` < ``n_head``. Its checkpoints export to Hugging Face's ``LlamaForCausalLM`` (lm/export.py).

    ``lm params llama-3.2-1b`` and ``llama-2-7b`` build Meta's two shapes and check their published counts.
    """

    Config = LlamaConfig
