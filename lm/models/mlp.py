"""Bengio et al. 2003's neural probabilistic language model, as makemore parts 2-3.

Reference: Y. Bengio, R. Ducharme, P. Vincent, C. Jauvin, "A Neural Probabilistic Language
Model", JMLR 3 (2003). Optional BatchNorm: S. Ioffe, C. Szegedy, "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift", ICML 2015.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lm.families import MLPConfig
from lm.models.base import WindowMLP

TANH_GAIN = 5.0 / 3.0
"""Kaiming gain for tanh (makemore part 3): keeps pre-activations near unit variance."""


class MLP(WindowMLP):
    """Concatenated embeddings of the previous ``block_size`` tokens → tanh hidden layer → logits.

    ``wte`` is Bengio's / makemore's C; ``hidden`` has no bias when BatchNorm (``bn``) follows, whose shift
    replaces it. Every position t of a (B, T) input is predicted from its window idx[:, t-k+1 .. t] (id 0
    before the start: makemore's '...'); in training only the positions with a target enter the network
    (:class:`WindowMLP`), so BatchNorm sees exactly the batch's examples.

    Parameters: V*n_embd + k*n_embd*n_hidden (+ n_hidden bias, or + 2*n_hidden BatchNorm) + n_hidden*V + V (the
    lectures' counts: ``lm params makemore-mlp``, ``makemore-mlp-bn``).
    """

    Config = MLPConfig
    components = {"wte": "token_embedding", "hidden": "feed_forward", "bn": "norm", "lm_head": "head"}

    def __init__(self, cfg: MLPConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.hidden = nn.Linear(cfg.block_size * cfg.n_embd, cfg.n_hidden, bias=not cfg.batchnorm)
        self.bn = nn.BatchNorm1d(cfg.n_hidden, momentum=cfg.bn_momentum) if cfg.batchnorm else None
        self.act = nn.Tanh()  # a module, so training-health hooks see its output (lm/inspection.py)
        self.lm_head = nn.Linear(cfg.n_hidden, vocab_size)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # C ~ N(0, 1) as makemore's torch.randn; hidden: Kaiming for tanh so the tanh is not
        # saturated at init; output: small ("make the last layer less confident", makemore
        # part 3/4) so the initial loss is ≈ ln V instead of a hockey stick.
        nn.init.normal_(self.wte.weight, std=1.0)
        fan_in = self.hidden.in_features
        nn.init.normal_(self.hidden.weight, std=TANH_GAIN / math.sqrt(fan_in))
        if self.hidden.bias is not None:
            nn.init.zeros_(self.hidden.bias)
        nn.init.normal_(self.lm_head.weight, std=0.1 / math.sqrt(self.lm_head.in_features))
        nn.init.zeros_(self.lm_head.bias)

    def window_logits(self, win: torch.Tensor) -> torch.Tensor:
        N, k = win.shape
        x = self.wte(win).view(N, k * self.cfg.n_embd)  # (N, k, E) -> (N, k*E): the k embeddings side by side
        h = self.hidden(x)  # (N, n_hidden)
        if self.bn is not None:
            h = self.bn(h)  # statistics over the N examples (train) / running stats (eval)
        return self.lm_head(self.act(h))  # (N, V)
