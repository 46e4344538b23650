"""Interpolated Kneser–Ney n-gram: the statistical baseline below the neural ladder (LLMfromScratch compares its
model with an n-gram model trained on the same corpus).

References: R. Kneser, H. Ney, "Improved backing-off for M-gram language modeling", ICASSP 1995 (absolute
discounting with continuation counts for the lower orders); S. F. Chen, J. Goodman, "An Empirical Study of
Smoothing Techniques for Language Modeling", Harvard TR-10-98, 1998 (interpolation, and the modified variant's
three discounts per order, eq. 26).

For a context h of k - 1 tokens and its shortening h' (the oldest token dropped)::

    p_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h)  +  γ_k(h) · p_{k-1}(w | h')
    γ_k(h)     = (D_k1 · N1(h•) + D_k2 · N2(h•) + D_k3+ · N3+(h•)) / c_k(h)
    p_0(w)     = 1 / V

where c_k(h w) is the raw count at the highest order n and the *continuation count* N1+(• h w) (how many
distinct tokens precede h w) below it; c_k(h) = Σ_w c_k(h w); Nr(h•) is the number of w with c_k(h w) = r
(3+: at least 3). A context never seen at order k (c_k(h) = 0) passes p_{k-1} through. Since D(c) <= c, each
order's distribution sums to exactly 1 (tests check 1e-9 in float64, for seen and unseen contexts).

Storage. Each order k keeps its n-grams as sorted int64 keys (the k tokens packed in base V, oldest most
significant, so a context's entries are one contiguous run) and their counts. The counts are frozen
``nn.Parameter`` s, so the study's parameter count of this family is its stored n-gram entries (component
'ngram', "n-gram entries" in the report); no optimizer ever sees them. Scoring is vectorised: per order, two
``searchsorted`` calls find every position's run of entries, and the discounted counts are scattered into a
dense (positions, V) table; no Python loop per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lm.families import NGramConfig
from lm.models.base import IGNORE_INDEX, LanguageModel, causal_windows, check_idx, lm_loss

CHUNK_ELEMENTS = 1 << 22
"""Scoring works on chunks of positions whose dense (positions, V) float64 table holds about this many numbers
(32 MB), so memory stays bounded on any vocabulary and split."""


class NGramTable(nn.Module):
    """The n-grams of one order: sorted packed ``keys`` (buffer), their ``counts`` (frozen parameter) and the
    order's three discounts (buffer). Sizes vary with the data, so loading resizes them to the checkpoint's."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keys", torch.zeros(0, dtype=torch.int64))
        self.counts = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)
        self.register_buffer("discounts", torch.zeros(3, dtype=torch.float64))  # for counts 1, 2, 3+

    def set(self, keys: torch.Tensor, counts: torch.Tensor, discounts: torch.Tensor) -> None:
        self.keys = keys
        self.counts.data = counts.to(torch.float64)
        self.discounts = discounts

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("keys", "counts"):  # take the checkpoint's size before the strict copy
            if prefix + name in state_dict:
                getattr(self, name).data = torch.empty_like(state_dict[prefix + name], device=self.keys.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"entries={self.keys.numel()}"


def modified_kn_discounts(counts: torch.Tensor) -> torch.Tensor:
    """Chen & Goodman's estimates (eq. 26) from the count-of-counts n1..n4 of one order:
    Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3.

    Where a ratio is undefined (a tiny corpus without counts of 2, 3 or 4), D_r = Y (plain Kneser–Ney's
    estimate), or 0.5 when Y is undefined too. Each D_r is clamped to [0, r], which keeps the order normalised.
    """
    n = [int((counts == r).sum()) for r in (1, 2, 3, 4)]
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] else 0.5
    out = []
    for r in (1, 2, 3):
        d = r - (r + 1) * y * n[r] / n[r - 1] if n[r - 1] and n[r] else y
        out.append(min(max(d, 0.0), float(r)))
    return torch.tensor(out, dtype=torch.float64)


class NGram(LanguageModel):
    """Interpolated (modified) Kneser–Ney n-gram of order ``cfg.order``; see the module docstring.

    ``accumulate(x, y)`` adds the n-grams of a batch (context: the n - 1 tokens up to x[t], left-padded with
    id 0 as every fixed-context family; target y[t], skipped where IGNORE_INDEX); the tables are rebuilt on the
    next forward or state_dict. ``forward`` returns log-probabilities as the logits (already normalised).
    """

    Config = NGramConfig
    components = {"counts": "ngram"}

    def __init__(self, cfg: NGramConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        if vocab_size**cfg.order >= 2**63:
            top = max(k for k in range(1, 64) if vocab_size**k < 2**63)
            raise ValueError(
                f"order {cfg.order} over a vocabulary of {vocab_size} does not fit int64 n-gram keys "
                f"({vocab_size}**{cfg.order} >= 2**63): use order <= {top}"
            )
        self.orders = nn.ModuleList(NGramTable() for _ in range(cfg.order))  # orders[k-1]: the k-grams
        self._pending: list[torch.Tensor] = []  # packed n-grams counted since the last rebuild
        self._runs: list[tuple[torch.Tensor, ...]] | None = None  # per order: cumulative sums for scoring
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module._rebuild())

    # -- fitting ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Count the n-grams (context window of x[t], y[t]) for every y[t] != IGNORE_INDEX."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        check_idx(x)
        V, n = self.vocab_size, self.cfg.order
        keep = y != IGNORE_INDEX
        ctx = causal_windows(x, n - 1)[keep]  # (B, T, n-1) -> (N, n-1), oldest first
        target = y[keep]  # (N,)
        lo, hi = (
            (min(int(ctx.min()), int(target.min())), max(int(ctx.max()), int(target.max())))
            if target.numel()
            else (0, 0)
        )
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must lie in [0, {V}) (or be -1 for padding targets)")
        self._pending.append(self._pack(ctx) * V + target.long())  # (N,) packed n-grams
        self._runs = None

    @staticmethod
    def _pack_with(ctx: torch.Tensor, V: int) -> torch.Tensor:
        key = torch.zeros(ctx.shape[:-1], dtype=torch.int64, device=ctx.device)
        for j in range(ctx.size(-1)):  # oldest token most significant
            key = key * V + ctx[..., j].long()
        return key

    def _pack(self, ctx: torch.Tensor) -> torch.Tensor:
        return self._pack_with(ctx, self.vocab_size)

    @torch.no_grad()
    def _rebuild(self) -> None:
        """Merge the pending n-grams into the top order, then derive every lower order's continuation counts."""
        if not self._pending:
            return
        top = self.orders[-1]
        keys = torch.cat([top.keys, *[p.to(top.keys.device) for p in self._pending]])
        new = torch.ones(keys.numel() - top.keys.numel(), dtype=torch.float64, device=keys.device)
        counts = torch.cat([top.counts.data, new])
        self._pending = []
        keys, inverse = torch.unique(keys, return_inverse=True)  # sorted
        counts = torch.zeros(keys.numel(), dtype=torch.float64, device=keys.device).index_add_(0, inverse, counts)
        top.set(keys, counts, self._discounts(counts))
        V = self.vocab_size
        for k in range(self.cfg.order - 1, 0, -1):  # k-grams from the distinct (k+1)-grams
            # Dropping the oldest token of each distinct (k+1)-gram and counting what remains gives N1+(• g).
            shorter, cc = torch.unique(self.orders[k].keys % V**k, return_counts=True)
            self.orders[k - 1].set(shorter, cc.to(torch.float64), self._discounts(cc))
        self._runs = None

    def _discounts(self, counts: torch.Tensor) -> torch.Tensor:
        if self.cfg.discount is None:
            return modified_kn_discounts(counts)
        return torch.full((3,), self.cfg.discount, dtype=torch.float64)

    def _cumulative(self) -> list[tuple[torch.Tensor, ...]]:
        """Per order, running sums over the sorted entries of counts and of (count == 1, 2, >= 3), each with a
        leading 0: a context's totals are the difference at the two ends of its run. Then, per entry, what every
        scoring pass needs of it: its discounted count max(c - D, 0) and its next token (the key's last digit)."""
        if self._runs is None:
            self._rebuild()
            self._runs = []
            V = self.vocab_size
            for table in self.orders:
                c, d = table.counts.data, table.discounts
                sums = [c, (c == 1).double(), (c == 2).double(), (c >= 3).double()]
                cums = tuple(torch.cat([c.new_zeros(1), s.cumsum(0)]) for s in sums)
                discounted = (c - d[c.clamp(1, 3).long() - 1]).clamp_min(0)  # D1, D2 or D3+ by the entry's count
                self._runs.append((*cums, discounted, table.keys % V))
        return self._runs

    # -- scoring ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def distribution(self, ctx: torch.Tensor) -> torch.Tensor:
        """p(· | context) in float64 for every row of ``ctx`` (N, order - 1) token ids, oldest first: (N, V).

        The recursion unrolled: with Γ_k = γ_{k+1} ··· γ_n (the weight order k keeps after every higher order
        took its share), p_n = Γ_0 / V + Σ_k Γ_k · discounted_k / c_k. The unigram term is one row shared by
        every position, so the dense work is two (N, V) products; every higher order adds only its stored
        entries (a scatter), not a dense pass of its own.
        """
        V = self.vocab_size
        runs = self._cumulative()
        out = []
        for chunk in ctx.split(max(1, CHUNK_ELEMENTS // V)):
            N = chunk.size(0)
            h = torch.zeros(N, dtype=torch.int64, device=chunk.device)  # the empty context
            orders = []
            for k, table in enumerate(self.orders, start=1):
                if k > 1:  # lengthen the context by the next older token
                    h = chunk[:, -(k - 1)].long() * V ** (k - 2) + h
                orders.append(self._runs_of(h, table, runs[k - 1]))
            weight = torch.ones(N, dtype=torch.float64, device=chunk.device)  # Γ_k, from the top order down
            p = torch.zeros(N, V, dtype=torch.float64, device=chunk.device)
            for k in range(self.cfg.order, 0, -1):
                table, (start, end, total, gamma) = self.orders[k - 1], orders[k - 1]
                self._scatter(p, weight, start, end, total, table, runs[k - 1][4:], dense=k == 1)
                weight = weight * gamma
            out.append(p + weight[:, None] / V)  # Γ_0 · p_0, p_0 uniform
        return torch.cat(out)

    def _runs_of(self, h: torch.Tensor, table: NGramTable, run) -> tuple[torch.Tensor, ...]:
        """For contexts h (N,) (packed k-1 tokens): where each one's entries lie in the table (start, end), its
        count c_k(h) and its γ_k(h) (1 for a context never seen: it passes p_{k-1} through)."""
        V = self.vocab_size
        cum_c, cum_1, cum_2, cum_3 = run[:4]
        start = torch.searchsorted(table.keys, h * V)  # (N,) the run of entries h w, w = 0 .. V-1
        end = torch.searchsorted(table.keys, h * V + V)  # (N,)
        total = cum_c[end] - cum_c[start]  # c_k(h), (N,)
        d = table.discounts  # (3,) float64: D1, D2, D3+
        n1, n2, n3 = (cum[end] - cum[start] for cum in (cum_1, cum_2, cum_3))  # N1(h•), N2(h•), N3+(h•)
        mass = d[0] * n1 + d[1] * n2 + d[2] * n3  # the probability the discounts free for the lower order
        gamma = torch.where(total > 0, mass / total.clamp_min(1), torch.ones_like(total))
        return start, end, total, gamma

    def _scatter(self, p, weight, start, end, total, table: NGramTable, entries, dense: bool) -> None:
        """p[i, w] += weight_i · max(c(h_i w) - D, 0) / c(h_i) over the stored entries of each context h_i;
        `entries`: every entry's max(c - D, 0) and next token (from :meth:`_cumulative`)."""
        V = self.vocab_size
        discounted, token = entries
        if dense:  # the unigram order: one context, one row for every position
            row = torch.zeros(V, dtype=torch.float64, device=p.device)
            if discounted.numel():
                row[table.keys] = discounted / table.counts.data.sum()
            p.add_(weight[:, None] * row[None, :])  # (N, 1) * (1, V)
            return
        lengths = end - start  # entries per position
        per_entry = lambda x: torch.repeat_interleave(x, lengths)  # noqa: E731  (N,) -> (E,): cheaper than x[rows]
        rows = per_entry(torch.arange(start.numel(), device=p.device))  # (E,)
        first = torch.cumsum(lengths, 0) - lengths  # where each position's entries begin in the flat list
        entry = per_entry(start - first) + torch.arange(rows.numel(), device=p.device)  # (E,) index into table
        p[rows, token[entry]] += per_entry(weight) * discounted[entry] / per_entry(total)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = check_idx(idx)
        ctx = causal_windows(idx, self.cfg.order - 1).reshape(B * T, -1)  # (B, T, n-1) -> (B*T, n-1)
        logits = self.distribution(ctx).log().float().view(B, T, self.vocab_size)  # (B*T, V) -> (B, T, V)
        return logits, lm_loss(logits, targets)

    def extra_repr(self) -> str:
        return f"order={self.cfg.order}, vocab_size={self.vocab_size}, discount={self.cfg.discount or 'modified'}"
