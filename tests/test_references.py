"""Published numbers live in one place (lm/references.py), and the pipeline's own numbers meet them.

- No module of lm/, stages/ or bench/ but lm/references.py writes a published number, in code or in prose.
- Every key a params file names (report.anchors, report.per_token) is one lm/references.py has.
- The count bigram computes makemore lecture 1's number: exactly the from-scratch recipe on the fixture names, and on
  the real names.txt the committed pipeline output (metrics/names-bigram_counts.json, all/loss) reproduces the
  published value within its stated tolerance, whose reason (float32 summation) is checked here too.
- The committed Kneser–Ney 4-gram on names meets EurekaLabsAI/ngram's 4-gram bar.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import yaml

from lm.batches import Batches
from lm.config import TokenizerConfig, load_params
from lm.families import BigramCountsConfig
from lm.metrics import score
from lm.models import build_model
from lm.references import PUBLISHED, published
from lm.tokenizer import encode_split, train_tokenizer

from tiny import ROOT, SOURCE_CORPORA

CODE = sorted(p for d in ("lm", "stages", "bench") for p in (ROOT / d).rglob("*.py") if p.name != "references.py")


def significant_digits(v: float) -> int:
    return len(repr(v).replace(".", "").replace("-", "").strip("0")) if isinstance(v, float) else len(str(v))


def written_forms(v: float) -> list[str]:
    """How a number is written in code or prose: 163,009,536 / 163_009_536 / 163009536; 2.4544."""
    return [f"{v:,}", f"{v:_}", str(v)] if isinstance(v, int) else [repr(v)]


def distinctive(v: float) -> bool:
    """Specific enough to find in prose: a count of four digits or more, a decimal of four significant digits."""
    return v >= 1000 if isinstance(v, int) else significant_digits(v) >= 4


IN_TEXT = {k: p for k, p in PUBLISHED.items() if distinctive(p.value)}
# Shorter decimals (2.17, 1.92, 42.7) would match unrelated prose: they are caught as numeric literals in code. Small
# counts (729, 300) and two-digit shares are everyday numbers (timeouts, 27 x 27): not checked.
AS_LITERAL = {k: p for k, p in PUBLISHED.items() if isinstance(p.value, float) and significant_digits(p.value) >= 3}


def literal_problems(path) -> list[str]:
    source = path.read_text()
    rel = path.relative_to(ROOT)
    problems = []
    for key, p in IN_TEXT.items():
        for form in written_forms(p.value):
            for m in re.finditer(rf"(?<![\d.,_]){re.escape(form)}(?![\d_]|,\d)", source):
                line = source.count("\n", 0, m.start()) + 1
                problems.append(f"{rel}:{line} writes {form}: read it from lm/references.py ({key})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            for key, p in AS_LITERAL.items():
                if node.value == p.value and not (isinstance(node.value, float) ^ isinstance(p.value, float)):
                    problems.append(f"{rel}:{node.lineno} has the literal {node.value!r}: use lm/references.py ({key})")
    return problems


def test_no_published_number_is_written_outside_lm_references():
    assert CODE and [p for f in CODE for p in literal_problems(f)] == []


def test_the_check_finds_a_published_number(tmp_path):
    """It fails on what it should: a copied value, in code or in a docstring, in either spelling of a count."""
    planted = ROOT / "lm" / "_planted_for_test.py"
    planted.write_text('"""nanoGPT reaches 1.4697; Let\'s build GPT has 10,788,929 parameters."""\nTARGET = 1.92\n')
    try:
        found = literal_problems(planted)
    finally:
        planted.unlink()
    assert any("1.4697" in p for p in found) and any("10,788,929" in p for p in found)
    assert any("literal 1.92" in p and "makemore-transformer-test" in p for p in found)


def test_every_published_number_says_what_it_measures_and_where_from():
    for key, p in PUBLISHED.items():
        assert re.fullmatch(r"[a-z0-9.-]+", key), key
        assert p.measures and p.source, key
        assert p.url == "" or p.url.startswith("https://"), key
        assert (p.tolerance is None) or (p.metric is not None), key  # a value to reproduce is a run's metric


@pytest.mark.parametrize("params", ["params.yaml", "presets/sources.yaml", "presets/tiny.yaml"])
def test_params_name_published_numbers_that_exist(params):
    cfg = load_params(ROOT / params)  # validation resolves every key
    for a in cfg.report.anchors:
        assert a.reference is PUBLISHED[a.published] and a.reference.metric is not None
    raw = yaml.safe_load((ROOT / params).read_text())
    assert not any("target" in a for a in raw.get("report", {}).get("anchors", []))  # no copied numbers


# ----------------------------------------------------------------------------------------------
# the count bigram: makemore lecture 1's number


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


def test_makemore_sums_in_float32_and_the_pipeline_reproduces_it():
    """makemore lecture 1 adds 228,146 float32 log-probabilities one at a time: done so on the real names.txt it
    gives the published value to its four decimals, and the float64 sum the pipeline computed (committed
    metrics/names-bigram_counts.json) is within the tolerance lm/references.py states."""
    ref = published("makemore-bigram-nll")
    names = (SOURCE_CORPORA / "names.txt").read_text().splitlines()
    chars = ["."] + sorted(set("".join(names)))
    index = {c: i for i, c in enumerate(chars)}
    pairs = np.array([(index[a], index[b]) for n in names for a, b in zip("." + n, n + ".")])
    counts = np.zeros((len(chars), len(chars)), dtype=np.float32)
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
    probs = (counts + 1) / (counts + 1).sum(1, keepdims=True)
    logp = np.log(probs[pairs[:, 0], pairs[:, 1]]).astype(np.float32)
    float32_sum = np.cumsum(logp, dtype=np.float32)[-1]  # a sequential scan: one addition at a time
    assert len(pairs) == 228_146
    assert round(-float(float32_sum) / len(pairs), 4) == ref.value
    ours = json.loads((ROOT / "metrics" / "names-bigram_counts.json").read_text())
    assert ours["all/tokens"] == len(pairs)
    assert abs(ours[ref.metric] - ref.value) <= ref.tolerance
    assert ours[ref.metric] == pytest.approx(-float(logp.astype(np.float64).sum()) / len(pairs), rel=1e-6)


def test_the_committed_kneser_ney_4gram_meets_the_published_4gram():
    ref = published("eureka-ngram-test")
    ours = json.loads((ROOT / "metrics" / "names-ngram-4.json").read_text())
    assert ours[ref.metric] <= ref.value
