"""The report's tables that the tiny pipeline does not reach: 'What each change buys' (an ablation chain) and
'N-gram order against val bpc', built from a study and a run table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from lm.config import StudyConfig
from lm.report import _change, ablation_table, ngram_orders

ROOT = Path(__file__).resolve().parents[1]
BASE = {"family": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


def study(runs: dict, ablation: list[str]) -> StudyConfig:
    raw = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())
    raw["runs"] = {name: {"tokenizer": "shakespeare-char", "model": model} for name, model in runs.items()}
    raw["report"]["ablation"] = ablation
    return StudyConfig.model_validate(raw)


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
    raw = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())
    raw["runs"] = {n: {"tokenizer": "shakespeare-char", "model": BASE} for n in ("long", "short")}
    raw["report"] |= {"anchors": anchors, "per_token": per_token or []}
    return StudyConfig.model_validate(raw)


def test_anchor_table_says_met_missed_or_partial(tmp_path):
    import json

    from lm.report import anchor_table

    for name, val, steps, sel in [("long", 1.46, 5000, 2000), ("short", 2.5, 20, 20)]:
        m = {"val/loss": val, "test/loss": val + 0.01, "train/steps": steps, "train/selected_step": sel}
        (tmp_path / f"{name}.json").write_text(json.dumps(m))
    s = anchored(
        [
            {"run": "long", "target": 1.4697, "source": "nanoGPT", "steps": 5000},
            {"run": "long", "metric": "test/loss", "target": 1.45, "source": "made up"},
            {"run": "short", "target": 1.4697, "source": "nanoGPT", "steps": 5000},
        ]
    )
    rows = anchor_table(s, tmp_path).splitlines()[2:]
    assert rows[0] == "| val/loss | nanoGPT | long | 2,000 of 5,000 | 1.4697 | 1.4600 | -0.0097 | **met** |"
    assert rows[1].endswith("| 1.4500 | 1.4700 | +0.0200 | missed |")
    assert rows[2].endswith("| partial: 20 of the source's 5,000 steps |")  # cut short: not called a miss


def test_anchor_runs_and_per_token_corpora_must_exist():
    with pytest.raises(ValueError, match=r"report.anchors\[0\].run: got 'nope'; must be a run of `runs`"):
        anchored([{"run": "nope", "target": 2.0, "source": "x"}])
    with pytest.raises(ValueError, match=r"report.per_token\[0\].corpus: got 'mars'; must be one of"):
        anchored([], [{"corpus": "mars", "ppl": 42.7, "source": "x"}])


def test_per_token_reference_is_read_through_bits_per_character():
    from lm.report import per_token_table

    s = anchored([], [{"corpus": "oz", "ppl": 42.7, "source": "seed 002"}])
    t = pd.DataFrame(
        [
            {"run": "oz-char", "corpus": "oz", "tokenizer": "oz-char", "val ppl": 3.9, "val bpc": 1.9637},
            {"run": "oz-bpe", "corpus": "oz", "tokenizer": "oz-bpe512", "val ppl": 16.0, "val bpc": 1.8},
            {"run": "sh", "corpus": "shakespeare", "tokenizer": "sh", "val ppl": 4.0, "val bpc": 2.0},
        ]
    )
    text = per_token_table(s, t)
    assert "perplexity 42.7 per token = 5.416 bits per token" in text  # log2(42.7)
    assert "| oz-char | oz-char | 3.90 | 1.9637 | 2.76 |" in text  # 5.416 / 1.9637 characters per token
    assert "| oz-bpe | oz-bpe512 | 16.00 | 1.8000 | 3.01 |" in text and "| sh |" not in text
