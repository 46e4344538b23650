"""A WaveNet-style hierarchical MLP, as makemore part 5.

References: A. van den Oord et al., "WaveNet: A Generative Model for Raw Audio",
arXiv:1609.03499 (2016): the tree of dilated causal convolutions that fuses neighbours pairwise,
here written (as in makemore) as Linear layers over pairs of consecutive positions. BatchNorm:
S. Ioffe, C. Szegedy, ICML 2015.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lm.families import WaveNetConfig
from lm.models.base import WindowMLP
from lm.models.mlp import TANH_GAIN


class FlattenConsecutive(nn.Module):
    """(N, L, C) → (N, L/n, n*C): concatenate each run of ``n`` neighbouring positions (makemore part 5)."""

    def __init__(self, n: int = 2):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        # Positions (0,1), (2,3), ... become one position with their features side by side.
        return x.reshape(N, L // self.n, C * self.n)  # (N, L/n, n*C)


class FusionLevel(nn.Module):
    """FlattenConsecutive(2) → Linear(2*dim_in, n_hidden) → BatchNorm → tanh, on (N, L, C) activations.

    The BatchNorm normalises each channel over dims (0, 1), i.e. over every window *and* every
    pair position in it: the fix of makemore part 5, where the first version only averaged
    over dim 0. It is an ``nn.BatchNorm1d`` applied to the (N*L, C) flattened view, which
    computes exactly those statistics (and PyTorch's biased/unbiased variance conventions).
    """

    def __init__(self, dim_in: int, n_hidden: int, bias: bool):
        super().__init__()
        self.flatten = FlattenConsecutive(2)
        self.fc = nn.Linear(2 * dim_in, n_hidden, bias=bias)
        self.bn = nn.BatchNorm1d(n_hidden)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(self.flatten(x))  # (N, L, C) -> (N, L/2, 2C) -> (N, L/2, H)
        N, L, H = x.shape
        x = self.bn(x.reshape(N * L, H)).view(N, L, H)  # stats over (N, L): (N*L, H) -> (N, L, H)
        return self.act(x)


class WaveNet(WindowMLP):
    """Embeddings → log2(k) fusion levels (pairs of neighbours, then pairs of pairs, ...) → logits.

    Every position t of a (B, T) input is predicted from its own window idx[:, t-k+1 .. t] (id 0 before
    the start), so the windows are one batch of independent examples, exactly makemore's (in training only
    those with a target: :class:`WindowMLP`). A real WaveNet would share the lower levels of overlapping
    windows (dilated convolutions); recomputing them per window keeps the BatchNorm statistics makemore's.

    ``bias``: the Language modeling journey's net (k 8, emb 20, hidden 200) keeps the fusion Linears' biases;
    makemore lecture 5's (k 8, emb 24, hidden 128) drops them (their counts: ``lm params journey-wavenet-176k``,
    ``makemore-wavenet-76k``).
    """

    Config = WaveNetConfig
    components = {"wte": "token_embedding", "levels": "feed_forward", "bn": "norm", "lm_head": "head"}

    def __init__(self, cfg: WaveNetConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        bias = cfg.bias
        n_levels = int(math.log2(cfg.block_size))
        if 2**n_levels != cfg.block_size:
            raise ValueError(f"wavenet block_size must be a power of two, got {cfg.block_size}")
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        dims = [cfg.n_embd] + [cfg.n_hidden] * (n_levels - 1)
        self.levels = nn.ModuleList(FusionLevel(d, cfg.n_hidden, bias) for d in dims)
        self.lm_head = nn.Linear(cfg.n_hidden, vocab_size)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # As makemore: C ~ N(0, 1); Kaiming-for-tanh fusion weights (BatchNorm makes their
        # scale matter little); a small output layer so the initial loss is ≈ ln V.
        nn.init.normal_(self.wte.weight, std=1.0)
        for level in self.levels:
            nn.init.normal_(level.fc.weight, std=TANH_GAIN / math.sqrt(level.fc.in_features))
            if level.fc.bias is not None:
                nn.init.zeros_(level.fc.bias)
        nn.init.normal_(self.lm_head.weight, std=0.1 / math.sqrt(self.lm_head.in_features))
        nn.init.zeros_(self.lm_head.bias)

    def window_logits(self, win: torch.Tensor) -> torch.Tensor:
        x = self.wte(win)  # (N, k) ids -> (N, k, E): one window per row
        for level in self.levels:
            x = level(x)  # (N, L, C) -> (N, L/2, H); after the last level L = 1
        return self.lm_head(x.squeeze(1))  # (N, 1, H) -> (N, H) -> (N, V)
