"""The Kneser–Ney n-gram family: exact normalisation, a hand-computed toy corpus, an independent dictionary
implementation, Chen & Goodman's discounts, checkpoints of any size. The shared contract (shapes, causality,
initial loss, bit-identical reruns) runs in tests/test_models.py for 'ngram'."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_model, save_model

from lm.config import RunConfig
from lm.families import NGramConfig
from lm.model_size import component_counts
from lm.models import build_model
from lm.models.ngram import modified_kn_discounts


def fitted(order: int, V: int, stream: np.ndarray, discount: float | None = None, pieces: int = 3):
    m = build_model(NGramConfig(family="ngram", order=order, discount=discount), V)
    ids = torch.as_tensor(stream, dtype=torch.long)
    for part in np.array_split(np.arange(len(ids) - 1), pieces):  # several accumulate calls merge
        lo, hi = int(part[0]), int(part[-1]) + 1
        m.accumulate(ids[None, lo:hi], ids[None, lo + 1 : hi + 1])
    return m


@pytest.mark.parametrize("V, order, discount", [(13, 2, None), (13, 5, None), (65, 8, None), (512, 3, None),
                                                (27, 4, 0.75)])  # fmt: skip
def test_distribution_sums_to_one(V, order, discount):
    """Random contexts, most of them never seen at the higher orders, and ids never seen at all."""
    rng = np.random.default_rng(V + order)
    stream = rng.integers(0, V - 2, 5000)  # the last two ids never occur: only the uniform floor gives them mass
    m = fitted(order, V, stream, discount)
    unseen = rng.integers(0, V, (500, order - 1))  # mostly never seen at the higher orders
    seen = np.lib.stride_tricks.sliding_window_view(stream, order - 1)[:500]
    ctx = torch.as_tensor(np.concatenate([unseen, seen]))
    p = m.distribution(ctx)
    assert p.dtype == torch.float64 and p.shape == (1000, V)
    assert (p > 0).all()
    assert (p.sum(dim=1) - 1).abs().max().item() < 1e-9


def test_hand_computed_bigram():
    """Pairs (0,1) (1,0) (0,1) (1,2) (2,0), D = 0.5, V = 3 (worked out by hand in the comments)."""
    m = build_model(NGramConfig(family="ngram", order=2, discount=0.5), 3)
    m.accumulate(torch.tensor([[0, 1, 0, 1, 2]]), torch.tensor([[1, 0, 1, 2, 0]]))
    # Unigram continuation counts N1+(•w): w=0 after {1, 2} → 2, w=1 after {0} → 1, w=2 after {1} → 1; total 4.
    # γ = 0.5·3/4 = 0.375: p1 = (1.5/4 + 0.125, 0.5/4 + 0.125, 0.5/4 + 0.125) = (0.5, 0.25, 0.25).
    # Context 0: c(0,1) = 2, γ = 0.5·1/2 = 0.25: p(·|0) = (0.25·0.5, 1.5/2 + 0.25·0.25, 0.25·0.25).
    # Context 1: c(1,0) = c(1,2) = 1, γ = 0.5·2/2 = 0.5: p(·|1) = (0.5/2 + 0.5·0.5, 0.5·0.25, 0.5/2 + 0.5·0.25).
    # Context 2: c(2,0) = 1, γ = 0.5: p(·|2) = (0.5 + 0.25, 0.125, 0.125).
    expected = torch.tensor([[0.125, 0.8125, 0.0625], [0.5, 0.125, 0.375], [0.75, 0.125, 0.125]], dtype=torch.float64)
    torch.testing.assert_close(m.distribution(torch.tensor([[0], [1], [2]])), expected, rtol=0, atol=1e-15)
    logits, loss = m(torch.tensor([[0, 1]]), torch.tensor([[1, 2]]))  # p(1|0) = 0.8125, p(2|1) = 0.375
    assert loss.item() == pytest.approx(-(math.log(0.8125) + math.log(0.375)) / 2, rel=1e-6)
    assert component_counts(m) == {"ngram": 4 + 3}  # 4 distinct bigrams and 3 unigram continuations


def reference(ngrams: list[tuple[int, ...]], order: int, V: int):
    """Interpolated modified Kneser–Ney straight from the formulas, with dictionaries."""
    counts = {order: Counter(ngrams)}
    for k in range(order - 1, 0, -1):
        counts[k] = Counter(g[1:] for g in counts[k + 1])  # continuation: distinct left extensions
    discounts = {k: modified_kn_discounts(torch.tensor(list(c.values()), dtype=torch.float64)).tolist()
                 for k, c in counts.items()}  # fmt: skip

    def p(w: int, h: tuple[int, ...]) -> float:
        k = len(h) + 1
        lower = 1 / V if k == 1 else p(w, h[1:])
        row = {g[-1]: c for g, c in counts[k].items() if g[:-1] == h}
        total = sum(row.values())
        if not total:
            return lower
        d = [discounts[k][min(c, 3) - 1] for c in row.values()]
        return (
            max(row.get(w, 0) - (discounts[k][min(row[w], 3) - 1] if w in row else 0), 0) / total
            + sum(d) / total * lower
        )

    return p


def test_matches_an_independent_implementation():
    V, order = 6, 3
    rng = np.random.default_rng(1)
    stream = rng.choice(V, 400, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    m = fitted(order, V, stream, pieces=1)  # (each accumulate call pads its own left edge)
    padded = np.r_[[0] * (order - 2), stream]  # the first target, stream[1], has context (0, stream[0])
    grams = [tuple(int(t) for t in padded[i : i + order]) for i in range(len(stream) - 1)]
    p = reference(grams, order, V)
    contexts = [(a, b) for a in range(V) for b in range(V)]
    ours = m.distribution(torch.tensor(contexts))
    theirs = torch.tensor([[p(w, h) for w in range(V)] for h in contexts], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_modified_discounts_chen_goodman():
    counts = torch.tensor([1.0] * 10 + [2.0] * 4 + [3.0] * 2 + [4.0] + [9.0] * 5)
    y = 10 / (10 + 2 * 4)
    d = modified_kn_discounts(counts).tolist()
    assert d == pytest.approx([1 - 2 * y * 4 / 10, 2 - 3 * y * 2 / 4, 3 - 4 * y * 1 / 2])
    assert modified_kn_discounts(torch.tensor([5.0, 7.0])).tolist() == [0.5, 0.5, 0.5]  # undefined: fallback


def test_checkpoint_of_any_size_round_trips(tmp_path: Path):
    m = fitted(4, 27, np.random.default_rng(2).integers(0, 27, 3000))
    save_model(m, str(tmp_path / "m.safetensors"))
    fresh = build_model(NGramConfig(family="ngram", order=4), 27)  # empty tables
    missing, unexpected = load_model(fresh, str(tmp_path / "m.safetensors"), strict=False)
    assert not missing and not unexpected
    x = torch.randint(0, 27, (3, 20))
    assert torch.equal(fresh(x)[0], m(x)[0])
    assert sum(p.numel() for p in fresh.parameters()) == sum(t.keys.numel() for t in m.orders) > 3000


def test_orders_that_overflow_int64_keys_are_refused():
    with pytest.raises(ValueError, match=r"order 8 over a vocabulary of 512 .* use order <= 6"):
        build_model(NGramConfig(family="ngram", order=8), 512)
    assert RunConfig.model_validate({"tokenizer": "t", "model": {"family": "ngram", "order": 3}}).train.max_steps
    with pytest.raises(ValueError, match="discount"):
        NGramConfig(family="ngram", discount=1.5)
