"""The report's tables that the tiny pipeline does not reach: 'What each change buys' (an ablation chain) and
'N-gram order against val bpc', built from a study and a run table."""

from __future__ import annotations

import pandas as pd
import pytest

from lm.config import StudyConfig, parse_params
from lm.references import published
from lm.report.tables import _change, ablation_table, ngram_orders

from tiny import tiny_params

BASE = {"family": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


def study(runs: dict, ablation: list[str]) -> StudyConfig:
    raw = tiny_params({name: {"tokenizer": "shakespeare-char", "model": model} for name, model in runs.items()})
    raw["report"]["ablation"] = ablation
    return parse_params(raw)


def table(rows: list[tuple]) -> pd.DataFrame:
    cols = ["run", "tokenizer", "family", "params", "val loss", "val bpc", "test loss"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


def test_ablation_rows_name_the_change_and_the_difference():
    s = study(
        {
            "a-gpt": BASE,
            "b-rms": {**BASE, "norm_class": "rmsnorm"},
            "c-llama": {**BASE, "family": "llama", "n_kv_head": 1},
        },
        ["a-gpt", "b-rms", "c-llama"],
    )
    t = table([("a-gpt", "t", "gpt", 1000, 2.0, 2.9, None), ("b-rms", "t", "gpt", 990, 1.9, 2.8, None),
               ("c-llama", "t", "llama", 900, 1.95, 2.85, None)])  # fmt: skip
    lines = ablation_table(s, t).splitlines()
    assert lines[2].startswith("| a-gpt | baseline | 1,000 | 2.0000 |")
    assert "| b-rms | norm_class: layernorm → rmsnorm | 990 (-1.0%) | 1.9000 | -0.1000 | 2.8000 | -0.1000 |" in lines[3]
    # The llama row: LLaMA's fixed choices against the rms row, and the family named once.
    assert lines[4].startswith("| c-llama | ") and "n_kv_head: default → 1" in lines[4] and "(family llama)" in lines[4]
    assert "pos: learned → rope" in lines[4] and "bias: true → false" in lines[4] and "+0.0500" in lines[4]


def test_change_ignores_equal_fields():
    assert _change({"family": "gpt", "n_embd": 16}, {"family": "gpt", "n_embd": 16}) == "none"


def test_ablation_names_must_be_runs():
    with pytest.raises(ValueError, match=r"report.ablation\[1\]: got 'nope'; must be a run of `runs`"):
        study({"a-gpt": BASE}, ["a-gpt", "nope"])


def test_ngram_order_table_bolds_the_best_val_order():
    runs = {f"ng-{n}": {"family": "ngram", "order": n} for n in (2, 3, 4)}
    s = study(runs, [])
    t = table([("ng-2", "shakespeare-char", "ngram", 100, 2.5, 3.6, 2.51), ("ng-3", "shakespeare-char", "ngram", 900,
               2.2, 3.1, 2.21), ("ng-4", "shakespeare-char", "ngram", 5000, 2.3, 3.3, 2.4)])  # fmt: skip
    text = ngram_orders(s, t)
    assert "**shakespeare-char**" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["2", "**3**", "4"]
    assert "5,000" in lines[-1] and "2.4000" in lines[-1]


def anchored(anchors: list[dict], per_token: list[dict] | None = None) -> StudyConfig:
    raw = tiny_params({n: {"tokenizer": "shakespeare-char", "model": BASE} for n in ("long", "short")})
    raw["report"] |= {"anchors": anchors, "per_token": per_token or []}
    return parse_params(raw)


def test_anchor_table_says_met_missed_partial_or_reproduced(tmp_path):
    import json

    from lm.report.tables import anchor_table

    nano, transformer, bigram = (
        published(k) for k in ("nanogpt-shakespeare-char-val", "makemore-transformer-test", "makemore-bigram-nll")
    )
    metrics = {
        "long": {"val/loss": nano.value - 0.01, "test/loss": transformer.value + 0.02, "train/steps": nano.steps,
                 "train/selected_step": 2000, "all/loss": bigram.value + bigram.tolerance / 2},
        "short": {"val/loss": 2.5, "train/steps": 20, "train/selected_step": 20, "all/loss": bigram.value + 0.01},
    }  # fmt: skip
    for name, m in metrics.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(m))
    s = anchored(
        [
            {"run": "long", "published": "nanogpt-shakespeare-char-val"},
            {"run": "long", "published": "makemore-transformer-test", "note": "a note"},
            {"run": "short", "published": "nanogpt-shakespeare-char-val"},
            {"run": "long", "published": "makemore-bigram-nll"},
            {"run": "short", "published": "makemore-bigram-nll"},
        ]
    )
    rows = anchor_table(s, tmp_path).splitlines()[2:]
    assert rows[0].startswith(f"| val/loss | [{nano.source}]({nano.url}) | long | 2,000 of {nano.steps:,} |")
    assert rows[0].endswith(f"| {nano.value:g} | {nano.value - 0.01:.4f} | -0.0100 | **met** |")
    assert "; a note | long |" in rows[1] and rows[1].endswith("| +0.0200 | missed |")
    assert rows[2].endswith(f"| partial: 20 of the source's {nano.steps:,} steps |")  # cut short: not called a miss
    assert rows[3].endswith("| **reproduced** |") and rows[4].endswith("| +0.0100 | differs |")


def test_anchors_name_runs_corpora_and_published_numbers_that_exist():
    with pytest.raises(ValueError, match=r"report.anchors\[0\].run: got 'nope'; must be a run of `runs`"):
        anchored([{"run": "nope", "published": "nanogpt-shakespeare-char-val"}])
    with pytest.raises(ValueError, match=r"report.anchors.0.published: got 'nanogpt-val'; must be a published"):
        anchored([{"run": "long", "published": "nanogpt-val"}])
    with pytest.raises(ValueError, match=r"report.anchors.0.published: got 'gpt2-small-params'; must be a"):
        anchored([{"run": "long", "published": "gpt2-small-params"}])  # a count, not a loss a run can meet
    with pytest.raises(ValueError, match=r"report.anchors.0.target: unknown key"):
        anchored([{"run": "long", "published": "nanogpt-shakespeare-char-val", "target": 1.0}])
    with pytest.raises(ValueError, match=r"report.per_token\[0\].corpus: got 'mars'; must be one of"):
        anchored([], [{"corpus": "mars", "published": "llmfromscratch-oz-ppl"}])


def test_per_token_reference_is_read_through_bits_per_character():
    import math

    from lm.report.tables import per_token_table

    ppl = published("llmfromscratch-oz-ppl").value
    bits = math.log2(ppl)
    s = anchored([], [{"corpus": "oz", "published": "llmfromscratch-oz-ppl"}])
    t = pd.DataFrame(
        [
            {"run": "oz-char", "corpus": "oz", "tokenizer": "oz-char", "val ppl": 3.9, "val bpc": 1.9637},
            {"run": "oz-bpe", "corpus": "oz", "tokenizer": "oz-bpe512", "val ppl": 16.0, "val bpc": 1.8},
            {"run": "sh", "corpus": "shakespeare", "tokenizer": "sh", "val ppl": 4.0, "val bpc": 2.0},
        ]
    )
    text = per_token_table(s, t)
    assert f"perplexity {ppl:g} per token = {bits:.3f} bits per token" in text
    assert f"| oz-char | oz-char | 3.90 | 1.9637 | {bits / 1.9637:.2f} |" in text  # characters per token to match
    assert f"| oz-bpe | oz-bpe512 | 16.00 | 1.8000 | {bits / 1.8:.2f} |" in text and "| sh |" not in text
