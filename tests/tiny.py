"""The tiny things every test shares: the test corpora (excerpts of the mirror), the tiny preset as a params dict,
one tiny model config per family variant, and the tiny GPT run the stage tests train.

Test corpora. The corpora are never committed: the tests read them from the mirror of ../shared/corpora (or
LM_TEST_CORPORA), checked against their SOURCES.md sha256s, and cut short excerpts of each into the
git-ignored .cache/test-corpora/ (same file names, their own sha256s), so the suite runs in minutes and
every stage sees the real files' encoding quirks (BOM, CRLF, the Gutenberg header).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml

from lm.families import (
    BigramCountsConfig,
    BigramNNConfig,
    BlockConfig,
    GPTConfig,
    LlamaConfig,
    MLPConfig,
    ModelConfig,
    MultiHeadConfig,
    NGramConfig,
    SingleHeadConfig,
    WaveNetConfig,
)

ROOT = Path(__file__).resolve().parents[1]
SOURCE_CORPORA = Path(os.environ.get("LM_TEST_CORPORA") or ROOT.parent / "shared" / "corpora")
"""Where the full corpora are: the offline mirror beside the clone (LM_TEST_CORPORA overrides)."""
SOURCE_SHA256 = {
    "names.txt": "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
    "tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "wonderful_wizard_of_oz.txt": "74a6f88582b1695274607c0a65d3cf89439757a947dd5ce9b44ae6f737b118ab",
    "dorothy_and_the_wizard_in_oz.txt": "5101b2fb76257a5f9035f0b9b5ff93a1dd86c4c1c326da20b7ea5e7a8b583651",
    "SMSSpamCollection": "55341228082b25b832a5868a5ab4b038142a57f70c676c123280af6ff457fe46",
}
"""The full corpora the excerpts are cut from (../shared/corpora/SOURCES.md)."""
FIXTURE_CORPORA = ROOT / ".cache" / "test-corpora"


def _lines(raw: bytes, n: int, sep: bytes = b"\n") -> bytes:
    return sep.join(raw.split(sep)[:n]) + sep


def _excerpts(source: Path) -> dict[str, bytes]:
    """File name → excerpt: the first 2,000 names (no newline after the last, as the original); the first 1,500
    lines of Tiny Shakespeare; the first 900 lines of The Wonderful Wizard of Oz (its last tenth then has no
    character the rest lacks, as a char tokenizer needs); Dorothy and the Wizard in Oz's Gutenberg header and
    150 lines after it, then its last 10 lines (the footer); the first 1,200 messages of the SMS Spam Collection
    (CRLF, 181 spam)."""
    raw = {}
    for name, expected in SOURCE_SHA256.items():
        path = source / name
        if not path.is_file():
            raise pytest.UsageError(
                f"the tests read the corpora from {source}, which lacks {name}: put the offline mirror "
                "(names.txt, tinyshakespeare.txt, ...) at ../shared/corpora beside the clone, or set LM_TEST_CORPORA"
            )
        raw[name] = path.read_bytes()
        if hashlib.sha256(raw[name]).hexdigest() != expected:
            raise pytest.UsageError(f"{path} does not have the sha256 SOURCES.md gives ({expected}): a damaged copy")
    dorothy = raw["dorothy_and_the_wizard_in_oz.txt"].split(b"\r\n")
    start = next(i for i, line in enumerate(dorothy) if line.startswith(b"*** START OF"))
    return {
        "names.txt": b"\n".join(raw["names.txt"].split(b"\n")[:2000]),
        "tinyshakespeare.txt": _lines(raw["tinyshakespeare.txt"], 1500),
        "wonderful_wizard_of_oz.txt": _lines(raw["wonderful_wizard_of_oz.txt"], 900),
        "dorothy_and_the_wizard_in_oz.txt": b"\r\n".join(dorothy[: start + 151] + dorothy[-10:]),
        "SMSSpamCollection": _lines(raw["SMSSpamCollection"], 1200, b"\r\n"),
    }


def _write_excerpts() -> dict[str, str]:
    """Cut the excerpts into FIXTURE_CORPORA (rewritten only where they differ); return name → sha256."""
    FIXTURE_CORPORA.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, data in _excerpts(SOURCE_CORPORA).items():
        path = FIXTURE_CORPORA / name
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


FIXTURE_SHA256 = _write_excerpts()
"""File name → sha256 of each test corpus excerpt."""


def on_fixtures(params: dict) -> dict:
    """`params` with every corpus pointing at its fixture excerpt (same file name, the fixture's sha256)."""
    for corpus in params["corpora"].values():
        corpus["sha256"] = FIXTURE_SHA256[corpus["filename"]]
    return params


def with_runs(params: dict, runs: dict) -> dict:
    """`params` with `runs` as its runs, and the report's lists that name runs (ablation, anchors) kept to those."""
    params["runs"] = runs
    for section in ("finetune", "probes"):  # the classifiers of runs that are gone go too
        params[section] = {k: f for k, f in params.get(section, {}).items() if f["run"] in runs}
    params["gguf"] = {k: g for k, g in params.get("gguf", {}).items() if k in runs}  # keyed by the run
    report = params.setdefault("report", {})
    report["ablation"] = [r for r in report.get("ablation", []) if r in runs]
    report["anchors"] = [a for a in report.get("anchors", []) if a["run"] in runs]
    return params


def tiny_params(runs: dict | None = None, *, tokenizers: list[str] | None = None, tracking: bool = True) -> dict:
    """presets/tiny.yaml on the fixture corpora; with `runs` instead of its own, with only the `tokenizers` named
    (and their corpora, and the baselines, fine-tunes and probes of those), and with tracking off unless
    `tracking`."""
    params = on_fixtures(yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text()))
    if tokenizers is not None:
        params["tokenizers"] = {t: params["tokenizers"][t] for t in tokenizers}
        params["corpora"] = {c: params["corpora"][c] for c in {t["corpus"] for t in params["tokenizers"].values()}}
        for section in ("baselines", "finetune", "probes"):
            params[section] = {k: b for k, b in params.get(section, {}).items() if b["corpus"] in params["corpora"]}
    if not tracking:
        params["tracking"] = {"enabled": False}
    return params if runs is None else with_runs(params, runs)


# ----------------------------------------------------------------------------------------------
# tiny models and runs

CONFIGS: dict[str, ModelConfig] = {
    "bigram_counts": BigramCountsConfig(family="bigram_counts"),
    "bigram_nn": BigramNNConfig(family="bigram_nn"),
    "ngram": NGramConfig(family="ngram", order=4),
    "mlp": MLPConfig(family="mlp", block_size=3, n_embd=16, n_hidden=32),
    "mlp_bn": MLPConfig(family="mlp", block_size=3, n_embd=16, n_hidden=32, batchnorm=True),
    "wavenet": WaveNetConfig(family="wavenet", block_size=8, n_embd=16, n_hidden=32),
    "single_head": SingleHeadConfig(family="single_head", block_size=8, n_embd=16),
    "multi_head": MultiHeadConfig(family="multi_head", block_size=8, n_embd=16, n_head=4),
    "block_pre": BlockConfig(family="block", block_size=8, n_embd=16, n_head=4),
    "block_post": BlockConfig(family="block", block_size=8, n_embd=16, n_head=4, norm="post", dropout=0.1),
    "gpt": GPTConfig(family="gpt", block_size=8, n_embd=16, n_head=4, n_layer=2, dropout=0.1),
    "gpt_post_sin_tied": GPTConfig(
        family="gpt", block_size=8, n_embd=16, n_head=2, n_layer=2, norm="post", pos="sinusoidal", tie_weights=True,
        qkv_bias=True, head_bias=True, bias=False,
    ),
    "gpt_switches": GPTConfig(
        family="gpt", block_size=8, n_embd=16, n_head=4, n_layer=2, norm_class="rmsnorm", pos="rope", mlp="swiglu",
        n_hidden=40, bias=False, n_kv_head=2, dropout=0.1,
    ),
    "llama": LlamaConfig(family="llama", block_size=8, n_embd=16, n_head=4, n_kv_head=2, n_layer=2, n_hidden=40),
    "llama_mqa_tied": LlamaConfig(
        family="llama", block_size=8, n_embd=16, n_head=4, n_kv_head=1, n_layer=1, multiple_of=8, tie_weights=True
    ),
}  # fmt: skip
"""One tiny config per family and per switch combination worth testing (a family's contract tests run on each)."""
ATTENTION = {k: c for k, c in CONFIGS.items() if c.context == "window"}
"""The attention families' tiny configs."""

GPT_RUN = {
    "tokenizer": "shakespeare-char",
    "model": {"family": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.1},
    "train": {
        "max_steps": 1200,
        "batch_size": 8,
        "lr": 0.003,
        "eval_interval": 500,
        "eval_batches": 2,
        "checkpoint_interval": 100,
    },
}
"""The tiny GPT run the stage tests train, kill and resume on the Shakespeare excerpt (long enough to interrupt)."""


def train_tiny(
    root: Path, name: str, splits: dict, fmt: str, tokenizer: dict, model: dict, logger=None, **train
) -> Path:
    """Train `model` (a model mapping) on `splits` in `root`, laid out as the pipeline's folders: its tokenizer
    (`tokenizer`: kind and vocab_size) in tokenizers/<name>-tok, the run in models/<name>, the curve in <name>.csv.
    `train`: train settings over 20 steps of batch 8 on the CPU. One torch thread (tiny models, shared cores).
    `logger`: the tracker train_run logs to (default: none). Returns the model folder."""
    import torch

    from lm.config import RunConfig, TokenizerConfig
    from lm.tokenizer import tokenize_corpus
    from lm.train_run import train_run

    tok_dir = root / "tokenizers" / f"{name}-tok"
    if not tok_dir.exists():
        tokenize_corpus(TokenizerConfig(corpus="c", **tokenizer), splits, fmt, tok_dir)
    settings = {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "eval_interval": 20, "eval_batches": 1, "device": "cpu"}
    run = RunConfig.model_validate({"tokenizer": tok_dir.name, "model": model, "train": settings | train})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(name, run, tok_dir, root / "models" / name, root / f"{name}.csv", progress=False, logger=logger)
    finally:
        torch.set_num_threads(threads)
    return root / "models" / name
