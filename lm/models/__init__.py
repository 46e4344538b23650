"""The model ladder: one ``nn.Module`` class per family, a registry, and a parameter classifier.

Every model is built as ``Model(cfg, vocab_size)`` and has ``cfg``, ``vocab_size`` and
``block_size`` (how many tokens of context it can use: 1 for the bigrams, ``cfg.block_size``
otherwise), and ``forward(idx (B, T), targets (B, T) | None) -> (logits (B, T, V), loss | None)``
with the loss the mean cross-entropy over positions whose target is not -1.

Attention families take any T <= block_size (ValueError beyond); the fixed-context families
(mlp, wavenet) take any T and left-pad each window with id 0; bigrams take any T.
"""

from __future__ import annotations

import torch.nn as nn

from lm.models.attention import BlockLM, CausalSelfAttention, MultiHead, SingleHead
from lm.models.bigram import BigramCounts, BigramNN
from lm.models.common import IGNORE_INDEX, lm_loss
from lm.models.gpt import GPT
from lm.models.mlp import MLP
from lm.models.wavenet import WaveNet

REGISTRY: dict[str, type[nn.Module]] = {
    "bigram_counts": BigramCounts,
    "bigram_nn": BigramNN,
    "mlp": MLP,
    "wavenet": WaveNet,
    "single_head": SingleHead,
    "multi_head": MultiHead,
    "block": BlockLM,
    "gpt": GPT,
}
"""Family name (``cfg.family``) → model class."""


def build_model(cfg, vocab_size: int) -> nn.Module:
    """Instantiate the model for ``cfg`` (any model config of :mod:`lm.config`).

    Initialisation draws from torch's global RNG: seed it (``torch.manual_seed``) first for a
    reproducible init. To count parameters of a big model without allocating it, build it
    under ``with torch.device("meta"):``.
    """
    family = getattr(cfg, "family", None)
    if family not in REGISTRY:
        raise ValueError(f"unknown model family {family!r}; must be one of {', '.join(REGISTRY)}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return REGISTRY[family](cfg, vocab_size)


COMPONENTS = ("token_embedding", "position_embedding", "attention", "feed_forward", "norm", "head", "other")
"""The parameter components reported by the parameter-distribution tool, in display order."""


def component_of(param_name: str) -> str:
    """Classify a parameter name from ``model.named_parameters()`` into one of :data:`COMPONENTS`.

    Names are matched by their dotted segments, so prefixes such as ``_orig_mod.``
    (torch.compile) or ``module.`` do not matter:

    - norm: ``ln_1``, ``ln_2``, ``ln_f`` (LayerNorm), ``bn`` (BatchNorm)
    - token_embedding: ``wte`` (every family; the bigram_nn table), ``log_probs`` (the
      bigram_counts table); a tied LM head is reported once, as ``transformer.wte.weight``
    - position_embedding: ``wpe`` (learned only: sinusoidal positions are a buffer)
    - attention: anything under ``attn`` (``c_attn`` = query/key/value, ``c_proj`` = output)
    - feed_forward: ``mlp`` (the transformer FFN), ``hidden`` (Bengio MLP hidden layer),
      ``levels`` (WaveNet fusion Linears; their BatchNorms are norm)
    - head: ``lm_head``
    - other: anything else
    """
    parts = param_name.split(".")
    if any(p in ("bn", "norm") or p.startswith("ln_") for p in parts):
        return "norm"
    if "wte" in parts or "log_probs" in parts:
        return "token_embedding"
    if "wpe" in parts:
        return "position_embedding"
    if "attn" in parts:
        return "attention"
    if any(p in ("mlp", "hidden", "levels") for p in parts):
        return "feed_forward"
    if "lm_head" in parts:
        return "head"
    return "other"


__all__ = [
    "COMPONENTS",
    "IGNORE_INDEX",
    "REGISTRY",
    "BigramCounts",
    "BigramNN",
    "BlockLM",
    "CausalSelfAttention",
    "GPT",
    "MLP",
    "MultiHead",
    "SingleHead",
    "WaveNet",
    "build_model",
    "component_of",
    "lm_loss",
]
