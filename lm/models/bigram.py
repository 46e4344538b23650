"""The two bigram models: a counted table and the same table learned by gradient descent.

Both predict token t+1 from token t alone (``block_size`` = 1), as makemore part 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lm.families import BigramCountsConfig, BigramNNConfig
from lm.models.base import IGNORE_INDEX, LanguageModel, check_idx, lm_loss


class BigramCounts(LanguageModel):
    """Count bigram frequencies and normalise with add-k smoothing (no gradient steps).

    ``counts`` (buffer, float64, (V, V)) holds count[x, y]: how often token y followed token x.
    ``log_probs`` (V, V) is log((counts + k) / row sum): the model's logits, already normalised,
    so softmax leaves them unchanged and the loss is the plain negative log-likelihood.

    Why ``log_probs`` is an ``nn.Parameter`` with ``requires_grad=False``: the table *is* the
    model's 729 (V*V) numbers, and the study counts parameters uniformly with
    ``sum(p.numel() for p in model.parameters())``. As a frozen parameter it is counted (and
    shows up in ``named_parameters`` for the parameter distribution) but no optimiser can move
    it; it is only ever rewritten by :meth:`accumulate`. ``counts`` stays a float64 buffer so that
    counting 228k bigrams is exact and the table can be refitted / inspected.

    Rows never seen in fitting (possible only with ``smoothing`` 0) fall back to the uniform
    distribution rather than 0/0 = NaN. With ``smoothing`` 0 an unseen pair in a seen row keeps
    log 0 = -inf: the unsmoothed model assigns it probability 0, so its loss on such a pair is
    honestly infinite.
    """

    Config = BigramCountsConfig
    components = {"log_probs": "token_embedding"}

    def __init__(self, cfg: BigramCountsConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.register_buffer("counts", torch.zeros(vocab_size, vocab_size, dtype=torch.float64))
        self.log_probs = nn.Parameter(torch.empty(vocab_size, vocab_size), requires_grad=False)
        self._normalise()

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add count[x, y] for every pair with y != -1 (and x != -1); renormalise.

        ``x`` and ``y`` are integer tensors of the same shape (e.g. a (B, T) batch and its
        targets, or two 1-D views of a token stream shifted by one). Calling it again adds
        to the counts, so a split can be fitted batch by batch.
        """
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        V = self.vocab_size
        x, y = x.reshape(-1), y.reshape(-1)  # (N,) pairs, whatever the batch layout was
        keep = (x != IGNORE_INDEX) & (y != IGNORE_INDEX)
        x, y = x[keep].to(self.counts.device), y[keep].to(self.counts.device)
        if x.numel() and (min(x.min(), y.min()) < 0 or max(x.max(), y.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V}) (or be -1 for padding targets)")
        # One bincount over the flattened pair index x*V + y: exact and fast.
        flat = torch.bincount(x * V + y, minlength=V * V).to(torch.float64)
        self.counts += flat.view(V, V)  # (V*V,) -> (V, V)
        self._normalise()

    @torch.no_grad()
    def _normalise(self) -> None:
        V = self.vocab_size
        if self.counts.is_meta:  # built on the meta device only to count parameters
            return
        smoothed = self.counts + self.cfg.smoothing  # (V, V) float64
        rows = smoothed.sum(dim=1, keepdim=True)  # (V, 1)
        empty = rows.squeeze(1) == 0
        # An all-zero row (unseen context, smoothing 0): uniform instead of 0/0.
        smoothed[empty] = 1.0
        rows[empty] = float(V)
        self.log_probs.copy_((smoothed / rows).log().to(self.log_probs.dtype))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        check_idx(idx)
        logits = self.log_probs[idx]  # (B, T) -> (B, T, V): the row of each context token
        return logits, lm_loss(logits, targets)

    def extra_repr(self) -> str:
        pairs = "?" if self.counts.is_meta else int(self.counts.sum())
        return f"vocab_size={self.vocab_size}, smoothing={self.cfg.smoothing:g}, pairs={pairs}"


class BigramNN(LanguageModel):
    """The bigram table learned by gradient descent: logits = one_hot(idx) @ W (makemore part 1).

    The one-hot product just selects row idx of W, so W is stored as an ``nn.Embedding(V, V)``
    named ``wte`` (a token embedding whose width is the vocabulary: each row is the logits of
    the next token). W starts at N(0, 0.01²): near-uniform predictions, initial loss ≈ ln V
    (makemore starts from N(0, 1), which costs a few tenths of a nat of "hockey stick").
    """

    Config = BigramNNConfig
    components = {"wte": "token_embedding"}

    def __init__(self, cfg: BigramNNConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.wte = nn.Embedding(vocab_size, vocab_size)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.01)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        check_idx(idx)
        logits = self.wte(idx)  # (B, T) -> (B, T, V); same as F.one_hot(idx, V).float() @ W
        return logits, lm_loss(logits, targets)
