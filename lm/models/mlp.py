"""Bengio et al. 2003's neural probabilistic language model, as makemore parts 2-3.

Reference: Y. Bengio, R. Ducharme, P. Vincent, C. Jauvin, "A Neural Probabilistic Language
Model", JMLR 3 (2003). Optional BatchNorm: S. Ioffe, C. Szegedy, "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift", ICML 2015.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lm.config import MLPConfig
from lm.models.common import causal_windows, check_idx, lm_loss

TANH_GAIN = 5.0 / 3.0
"""Kaiming gain for tanh (makemore part 3): keeps pre-activations near unit variance."""


class MLP(nn.Module):
    """Concatenated embeddings of the previous ``block_size`` tokens → tanh hidden layer → logits.

    Modules (names chosen so :func:`lm.models.component_of` classifies them):
    ``wte`` (Bengio's / makemore's C, (V, n_embd)), ``hidden`` (Linear(k*n_embd, n_hidden);
    no bias when BatchNorm follows, since BatchNorm's shift replaces it), ``bn`` (optional
    BatchNorm1d), ``lm_head`` (Linear(n_hidden, V)).

    Every position t of a (B, T) input gets a prediction from the window idx[:, t-k+1 .. t],
    with positions before the start filled with id 0 (makemore's '...' context on names),
    so the model is trained on all T positions of a sequence at once, like the transformers.

    BatchNorm treats all B*T positions as the batch. Positions whose target is -1 (padding
    after the end of a short name) still flow through it and contribute to the batch
    statistics and running averages; their inputs are real tokens ('.' padding), so this only
    shifts the statistics slightly and costs no correctness: the loss ignores them, and eval
    mode uses the running statistics, so each prediction then depends on its own window only.

    Parameter count: V*n_embd + k*n_embd*n_hidden (+ n_hidden bias, or + 2*n_hidden BatchNorm
    gain/shift) + n_hidden*V + V. Names: k=3, emb 5, hidden 200 → 8,762; emb 10 with
    BatchNorm → 12,097.
    """

    def __init__(self, cfg: MLPConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.hidden = nn.Linear(cfg.block_size * cfg.n_embd, cfg.n_hidden, bias=not cfg.batchnorm)
        self.bn = nn.BatchNorm1d(cfg.n_hidden) if cfg.batchnorm else None
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = check_idx(idx)
        k, E = self.block_size, self.cfg.n_embd
        win = causal_windows(idx, k)  # (B, T, k) ids: the context of every position
        emb = self.wte(win)  # (B, T, k, E)
        # Concatenate the k embeddings of each window; all B*T windows form one batch.
        x = emb.reshape(B * T, k * E)  # (B*T, k*E)
        h = self.hidden(x)  # (B*T, n_hidden)
        if self.bn is not None:
            h = self.bn(h)  # statistics over the B*T positions (train) / running stats (eval)
        h = torch.tanh(h)  # (B*T, n_hidden)
        logits = self.lm_head(h).view(B, T, self.vocab_size)  # (B*T, V) -> (B, T, V)
        return logits, lm_loss(logits, targets)
