"""The count bigram computes makemore lecture 1's number exactly: the mean NLL of the +k smoothed table over
every bigram of a names list, against a from-scratch count in plain Python (on the fixture names).

On the real names.txt (all 228,146 bigrams) the report stage recomputes it beside the published 2.4544
(reports/README.md, 'Published numbers'; `make verify` checks that it reproduces); the tiny pipeline test
checks that the report shows it.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from lm.batches import Batches
from lm.config import BigramCountsConfig, TokenizerConfig
from lm.metrics import score
from lm.models import build_model
from lm.tokenizer import encode_split, train_tokenizer


def makemore_nll(names: list[str], smoothing: float) -> tuple[float, int]:
    """makemore's recipe: N[a, b] counts over '.name.' pairs, P = (N + k) / row sums, NLL = -mean log P."""
    chars = ["."] + sorted(set("".join(names)))
    pairs = Counter((a, b) for n in names for a, b in zip("." + n, n + "."))
    rows = Counter()
    for (a, _), c in pairs.items():
        rows[a] += c
    nll = -sum(c * math.log((c + smoothing) / (rows[a] + smoothing * len(chars))) for (a, _), c in pairs.items())
    return nll / sum(pairs.values()), sum(pairs.values())


@pytest.mark.parametrize("smoothing", [1.0, 0.0, 0.5])
def test_names_bigram_counts_nll_over_all_bigrams(mirror, smoothing):
    names = (mirror / "names.txt").read_text().splitlines()
    tok = train_tokenizer(TokenizerConfig(corpus="names", kind="char"), {"train": names}, "lines")
    assert tok.get_vocab_size() == 27
    batches = Batches(encode_split(tok, names, "lines"), "lines", seq_len=0, boundary_id=0)
    model = build_model(BigramCountsConfig(family="bigram_counts", smoothing=smoothing), 27)
    for x, y in batches.iterate(4096):
        model.accumulate(x, y)
    total, count = score(model, batches.iterate(4096))
    expected, pairs = makemore_nll(names, smoothing)
    assert count == pairs == sum(len(n) + 1 for n in names)
    assert total / count == pytest.approx(expected, rel=1e-7)  # the table is float32, the sum float64
