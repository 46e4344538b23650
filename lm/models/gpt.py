"""A decoder-only transformer in the shape of nanoGPT's ``model.py`` (GPT-2 style).

References: A. Radford, J. Wu, R. Child, D. Luan, D. Amodei, I. Sutskever, "Language Models are
Unsupervised Multitask Learners", 2019 (GPT-2); A. Vaswani et al., "Attention Is All You Need",
NeurIPS 2017; O. Press, L. Wolf, "Using the Output Embedding to Improve Language Models", EACL
2017 (weight tying).

Parameter names are nanoGPT's: ``transformer.wte``, ``transformer.wpe``, ``transformer.h.{i}``
(``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``),
``transformer.ln_f``, ``lm_head``.

Counts (unique parameters): V=65, 6 layers, 6 heads, 384, context 256, bias, no qkv bias,
head bias, untied → 10,788,929 (seed 000). GPT-2 small (V 50257, ctx 1024, 768, 12 layers,
12 heads, no qkv bias, no head bias) → 163,009,536 untied, 124,412,160 tied.
"""

from __future__ import annotations

from lm.config import GPTConfig
from lm.models.attention import TransformerLM


class GPT(TransformerLM):
    """Token + position embeddings → ``n_layer`` transformer blocks → final LayerNorm → LM head.

    Config fields: ``n_layer``, ``n_head``, ``n_embd``, ``block_size``, ``dropout`` (embeddings,
    attention weights, residual branches; training only), ``bias`` (attention output
    projection, feed-forward Linears, LayerNorms), ``qkv_bias`` (``c_attn``), ``head_bias``
    (``lm_head``), ``tie_weights`` (``lm_head.weight`` is ``transformer.wte.weight``), ``pos``
    (``learned`` table or fixed ``sinusoidal`` buffer, no parameters), ``norm`` (``pre``: GPT-2,
    with ``ln_f``; ``post``: LayerNorm after each residual add, no ``ln_f``).

    Init: GPT-2's (see :meth:`lm.models.attention.CausalLM._init_weights`), with the untied
    LM head's std capped so the initial loss stays within ~0.05 nats of ln V.

    Sampling: ``forward(idx, cache=model.new_cache(B))`` is the incremental path (a
    :class:`~lm.models.attention.KVCache` of every block's keys and values): prefill the prompt
    once, then feed one token per step. ``forward(idx, targets)`` without a cache is unchanged.
    """

    def __init__(self, cfg: GPTConfig, vocab_size: int):
        super().__init__(
            cfg,
            vocab_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            block_size=cfg.block_size,
            dropout=cfg.dropout,
            norm=cfg.norm,
            bias=cfg.bias,
            qkv_bias=cfg.qkv_bias,
            head_bias=cfg.head_bias,
            tie_weights=cfg.tie_weights,
            pos=cfg.pos,
        )
