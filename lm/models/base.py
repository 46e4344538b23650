"""The family contract: what every model class declares, the registry it joins, and the pieces all share.

A family is two classes:

- its **config**, a subclass of :class:`lm.families.ModelConfig` (torch-free, so params validate fast): the
  ``family`` literal (its name), its fields, and ``fitting`` ('gradient' | 'counting'), ``context``
  ('fixed' | 'window') and ``block_size`` (the context length);
- its **model**, a subclass of :class:`LanguageModel` in a module of ``lm/models/``: ``Config`` (the config
  class, which registers the model under its family), ``kv_cache`` (incremental decoding), ``components``
  (which module holds which kind of parameter) and ``forward(idx, targets=None) -> (logits, loss)``.

Nothing else in the code base lists families or guesses what a family can do: it asks these declarations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.families import ModelConfig

IGNORE_INDEX = -1
"""Target id of padding positions: left out of every loss (and its mean) and of every score."""

COMPONENTS = ("token_embedding", "position_embedding", "attention", "feed_forward", "norm", "head", "other", "ngram")
"""The kinds of parameters the parameter distribution reports, in display order ('ngram': the stored n-gram
entries of the counting n-gram family, its "parameters")."""

REGISTRY: dict[str, type[LanguageModel]] = {}
"""Family name → model class, filled as :class:`LanguageModel` subclasses with a ``Config`` are defined."""


class LanguageModel(nn.Module):
    """Base of every family's model: ``Model(cfg, vocab_size)``, ``forward(idx (B, T), targets (B, T) | None)
    -> (logits (B, T, V), loss | None)``, the loss the mean cross-entropy over targets != IGNORE_INDEX."""

    Config: ClassVar[type[ModelConfig]]
    """The family's config class; defining it registers this model class as the family's."""
    kv_cache: ClassVar[bool] = False
    """Incremental decoding: ``new_cache(B)`` and ``forward(idx, cache=cache)`` feed only the new tokens."""
    components: ClassVar[Mapping[str, str]] = {}
    """Module (or parameter) name → component of :data:`COMPONENTS`. A parameter belongs to the component of the
    innermost name on its dotted path that is listed here ('levels.0.bn.weight': ``bn`` before ``levels``);
    a parameter under no listed name is 'other'."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if bad := set(cls.components.values()) - set(COMPONENTS):
            raise TypeError(f"{cls.__name__}.components uses unknown components {sorted(bad)}; allowed: {COMPONENTS}")
        if "Config" not in cls.__dict__:
            return  # a shared base (CausalLM, TransformerLM), not a family
        (family,) = get_args(cls.Config.model_fields["family"].annotation)
        if family in REGISTRY and REGISTRY[family].__qualname__ != cls.__qualname__:
            raise TypeError(f"family {family!r} has two model classes: {REGISTRY[family].__name__}, {cls.__name__}")
        REGISTRY[family] = cls

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size

    @property
    def block_size(self) -> int:
        """Context length: how many tokens a prediction can use (window families accept at most this many)."""
        return self.cfg.block_size

    def new_cache(self, batch_size: int):
        """An empty KV cache for ``batch_size`` sequences (families with ``kv_cache``)."""
        raise NotImplementedError(f"{type(self).__name__} has no KV cache (kv_cache is False)")

    def accumulate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Counting families (``Config.fitting == 'counting'``): add the (context, target) pairs to the counts."""
        raise NotImplementedError(f"{type(self).__name__} is not fitted by counting")

    @classmethod
    def component_of(cls, param_name: str) -> str:
        """The component of a parameter name from ``named_parameters()`` (prefixes such as ``_orig_mod.`` of
        torch.compile or ``module.`` of DDP do not matter)."""
        for part in reversed(param_name.split(".")):
            if part in cls.components:
                return cls.components[part]
        return "other"


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean next-token cross-entropy (nats) over every position whose target is not IGNORE_INDEX.

    ``logits`` (B, T, V), ``targets`` (B, T) or None (then None). If every target is ignored the mean is
    over zero positions and is NaN, as PyTorch's own; callers never score an all-padding batch.
    """
    if targets is None:
        return None
    B, T, V = logits.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets must have shape {(B, T)} to match idx, got {tuple(targets.shape)}")
    # cross_entropy wants classes on dim 1: flatten the positions into one batch.
    return F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), ignore_index=IGNORE_INDEX)  # (B*T, V)


def check_idx(idx: torch.Tensor) -> tuple[int, int]:
    """Validate token ids as a 2-D (B, T) integer tensor and return (B, T)."""
    if idx.dim() != 2:
        raise ValueError(f"idx must be a 2-D (batch, time) tensor of token ids, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must hold integer token ids (int64), got {idx.dtype}")
    return idx.shape[0], idx.shape[1]


def causal_windows(idx: torch.Tensor, k: int, pad_id: int = 0) -> torch.Tensor:
    """For every position t, the k token ids idx[:, t-k+1 .. t] (oldest first), as (B, T, k).

    Positions before the start are ``pad_id`` (0: on names the '.' boundary, so this is makemore's "..."
    context). A view of the padded ids: it costs one (B, T+k-1) copy, not B*T*k.
    """
    padded = F.pad(idx, (k - 1, 0), value=pad_id)  # (B, T) -> (B, k-1+T)
    return padded.unfold(1, k, 1)  # (B, k-1+T) -> (B, T, k): window t ends at original position t


class WindowMLP(LanguageModel):
    """Base of the fixed-context networks with BatchNorm (MLP, WaveNet): every position t is predicted from its
    own window idx[:, t-k+1 .. t] alone, so the windows are independent examples and ``window_logits`` maps a
    (N, k) batch of them to (N, V) logits.

    With targets, only the positions that have one (target != IGNORE_INDEX) are computed: BatchNorm's batch
    statistics must be those of real examples, as makemore's, not of the padding after a short name or the
    masked start of a text window (their logits are returned as 0, and no loss or score reads them). Without
    targets (sampling, scoring) every position is computed.
    """

    def window_logits(self, win: torch.Tensor) -> torch.Tensor:
        """(N, k) context ids, oldest first → (N, V) logits."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = check_idx(idx)
        win = causal_windows(idx, self.block_size)  # (B, T, k) ids: the context of every position
        if targets is None:
            logits = self.window_logits(win.reshape(B * T, -1))  # (B*T, k) -> (B*T, V)
            return logits.view(B, T, self.vocab_size), None  # (B*T, V) -> (B, T, V)
        if targets.shape != (B, T):
            raise ValueError(f"targets must have shape {(B, T)} to match idx, got {tuple(targets.shape)}")
        scored = targets != IGNORE_INDEX  # (B, T)
        rows = self.window_logits(win[scored])  # (N, k) -> (N, V): the examples alone
        logits = rows.new_zeros(B, T, self.vocab_size)
        logits[scored] = rows  # (N, V) back into (B, T, V)
        return logits, F.cross_entropy(rows, targets[scored])
