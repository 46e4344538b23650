"""Where a model's parameters are: counts and shares by component, per block, tied and untied,
bytes, and training FLOPs per token. The one implementation behind ``lm params``, the evaluate
stage's ``params_by_component`` and the report's parameter-share figure.

Models are built on the ``meta`` device (shapes, no storage), so counting GPT-2 XL's 1.6 B
parameters costs no memory and well under a second. Components are those each family declares
(``LanguageModel.components``): token embedding, position embedding, attention, feed-forward, norm,
head, other.

Weight tying (Press & Wolf 2017) shares the LM head's matrix with the token embedding. For the
``gpt`` family both variants are counted (the config builds one, the other is the same config
with ``tie_weights`` flipped); a tied matrix is counted once, as token embedding.

Training FLOPs per token follow PaLM's appendix B (Chowdhery et al. 2022)::

    6 N + 12 · n_layer · n_embd · ctx

6N: a forward pass costs 2 FLOPs (a multiply and an add) per parameter used in a matmul and the
backward pass twice that. The second term is the attention scores and their weighted sum
(q kᵀ and a v: 2 · 2 · ctx · n_embd per layer forward, x3 with the backward), which no
parameter accounts for; ctx is the full context (block_size) and the causal mask is not
discounted, as in PaLM. **N counts every parameter except the token and position embedding
tables**: a lookup is not a matmul. The LM head *is* a matmul (n_embd x vocab per token), so its
matrix counts even when it is tied to the token embedding; biases and norm gains count too
(negligible). For a tied GPT this N is nanoGPT's ``get_num_params(non_embedding=True)`` used in
its MFU estimate (GPT-2 small: 123,625,728). A counting family (bigram_counts) takes no FLOPs.

Sizes are the parameters' bytes (4 per parameter in fp32, 2 in bf16) in MB of 2**20 bytes, as the Raschka
learning journey gives GPT-2 small's (lm/references.py, gpt2-small-fp32-mb); optimizer state and activations are
not included.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lm.config import load_params
from lm.families import BigramNNConfig, GPTConfig, LlamaConfig, MLPConfig, ModelConfig, WaveNetConfig
from lm.models import COMPONENTS, build_model
from lm.models.attention import CausalSelfAttention
from lm.references import value

MB = 2**20
"""Bytes in the MB that sizes are reported in (the Raschka learning journey's MB: parameters x 4 / 2**20)."""
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}
LABELS = {
    "token_embedding": "token embedding",
    "position_embedding": "position embedding",
    "attention": "attention",
    "feed_forward": "feed-forward",
    "norm": "norm",
    "head": "head",
    "other": "other",
    "ngram": "n-gram entries",
}
_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.")  # transformer.h.{i}.… → block i


@dataclass(frozen=True)
class Reference:
    """A named configuration that ``lm params`` can count without a params file."""

    model: Any
    """The model config (any of lm.config's model configs)."""
    vocab_size: int
    description: str
    published: int | None = None
    """The parameter count the source documents report (tests check it is met exactly)."""


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    # The Raschka learning journey's config: vocab 50257, ctx 1024, qkv_bias false, untied head without bias.
    return GPTConfig(
        family="gpt",
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=1024,
        bias=True,
        qkv_bias=False,
        head_bias=False,
        tie_weights=False,
    )


REFERENCES: dict[str, Reference] = {
    "gpt2-small": Reference(
        _gpt2(12, 12, 768),
        50257,
        "GPT-2 small as the Raschka learning journey counts it (Raschka's config: qkv_bias false, untied head without "
        "bias)",
        value("gpt2-small-params"),
    ),
    "gpt2-medium": Reference(
        _gpt2(24, 16, 1024), 50257, "GPT-2 medium with the same settings", value("gpt2-medium-params")
    ),
    "gpt2-large": Reference(
        _gpt2(36, 20, 1280), 50257, "GPT-2 large with the same settings", value("gpt2-large-params")
    ),
    "gpt2-xl": Reference(_gpt2(48, 25, 1600), 50257, "GPT-2 XL with the same settings", value("gpt2-xl-params")),
    "llama-3.2-1b": Reference(
        LlamaConfig(
            family="llama",
            n_layer=16,
            n_head=32,
            n_kv_head=8,
            n_embd=2048,
            n_hidden=8192,
            block_size=131_072,
            rope_base=500_000.0,
            tie_weights=True,
        ),
        128_256,
        "Llama 3.2 1B (Meta 2024): 16 layers, d 2048, 32 heads, 8 KV heads, SwiGLU 8192, tied, ctx 128k",
        value("llama-3.2-1b-params"),
    ),
    "llama-2-7b": Reference(
        LlamaConfig(family="llama", n_layer=32, n_head=32, n_embd=4096, block_size=4096, tie_weights=False),
        32_000,
        "Llama 2 7B (Touvron et al. 2023): 32 layers, d 4096, 32 heads, SwiGLU 11,008 (the 256-multiple rule), untied",
        value("llama-2-7b-params"),
    ),
    "nanogpt-shakespeare-char": Reference(
        GPTConfig(
            family="gpt",
            n_layer=6,
            n_head=6,
            n_embd=384,
            block_size=256,
            dropout=0.2,
            bias=True,
            qkv_bias=False,
            head_bias=True,
            tie_weights=False,
        ),
        65,
        'the Language modeling journey / "Let\'s build GPT": Shakespeare char, 6L/6H/384, ctx 256, head bias, untied',
        value("lets-build-gpt-params"),
    ),
    "bigram-to-transformer-cpu": Reference(
        GPTConfig(
            family="gpt",
            n_layer=3,
            n_head=4,
            n_embd=128,
            block_size=64,
            bias=True,
            qkv_bias=False,
            head_bias=True,
            tie_weights=False,
        ),
        65,
        "the bigram-to-transformer project's CPU GPT: Shakespeare char, 3L/4H/128, ctx 64 (~0.6-0.85M)",
    ),
    "journey-wavenet-176k": Reference(
        WaveNetConfig(family="wavenet", block_size=8, n_embd=20, n_hidden=200, bias=True),
        27,
        "the Language modeling journey's WaveNet: names, ctx 8, emb 20, hidden 200, biased Linears",
        value("journey-wavenet-params"),
    ),
    "makemore-wavenet-76k": Reference(
        WaveNetConfig(family="wavenet", block_size=8, n_embd=24, n_hidden=128, bias=False),
        27,
        "makemore part 5's WaveNet: names, ctx 8, emb 24, hidden 128, bias-free Linears",
        value("makemore-wavenet-params"),
    ),
    "makemore-mlp": Reference(
        MLPConfig(family="mlp", block_size=3, n_embd=5, n_hidden=200),
        27,
        "Bengio et al. 2003 MLP on names: ctx 3, emb 5, hidden 200",
        value("makemore-mlp-params"),
    ),
    "makemore-mlp-bn": Reference(
        MLPConfig(family="mlp", block_size=3, n_embd=10, n_hidden=200, batchnorm=True),
        27,
        "the MLP with BatchNorm (Zero-to-Hero part 3): ctx 3, emb 10, hidden 200",
        value("makemore-mlp-bn-params"),
    ),
    "makemore-bigram": Reference(
        BigramNNConfig(family="bigram_nn"), 27, "the names bigram table (27 x 27)", value("makemore-bigram-params")
    ),
}
"""Reference configurations with their published counts (lm/references.py): GPT-2 with the Raschka learning journey's
settings, Llama 3.2 1B and Llama 2 7B, and the source documents' configurations (docs/sources.md)."""


# ----------------------------------------------------------------------------------------------
# counting


def component_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by component, only the components the model has, in order of first appearance.

    A tied tensor is counted once, under the first name that holds it (``transformer.wte.weight``:
    token embedding). This is what the evaluate stage writes as ``params_by_component``.
    """
    counts: dict[str, int] = {}
    for _, comp, n in _parameters(model):
        counts[comp] = counts.get(comp, 0) + n
    return counts


def _parameters(model: torch.nn.Module):
    """(name, component, numel) of every unique parameter (a tied tensor once, under its first name)."""
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, model.component_of(name), p.numel()


@dataclass(frozen=True)
class Counts:
    """One model's parameters by component (every component of COMPONENTS, zeros included) and per block."""

    components: dict[str, int]
    blocks: list[dict[str, int]] = field(default_factory=list)
    """Per transformer block (``transformer.h.{i}``), every component; empty for families without blocks."""

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def shares(self) -> dict[str, float]:
        """Fraction of the total per component."""
        return {c: n / self.total if self.total else 0.0 for c, n in self.components.items()}

    def megabytes(self) -> dict[str, float]:
        """Parameter bytes in MB (2**20 bytes) per dtype."""
        return {dt: self.total * b / MB for dt, b in BYTES_PER_PARAM.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "components": self.components,
            "shares": self.shares(),
            "bytes": {dt: self.total * b for dt, b in BYTES_PER_PARAM.items()},
            "mb": self.megabytes(),
        }


def count(model: torch.nn.Module) -> Counts:
    """Unique parameters of ``model`` by component, in total and per transformer block."""
    components = dict.fromkeys(COMPONENTS, 0)
    blocks: dict[int, dict[str, int]] = {}
    for name, comp, n in _parameters(model):
        components[comp] += n
        if m := _BLOCK.search(name):
            blocks.setdefault(int(m.group(1)), dict.fromkeys(COMPONENTS, 0))[comp] += n
    return Counts(components, [blocks[i] for i in sorted(blocks)])


INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "zeros_", "ones_", "constant_", "xavier_uniform_",
                  "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")  # fmt: skip
"""torch.nn.init's in-place initialisers: skipped while a model is built on the meta device (:func:`build_meta`)."""


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """torch.nn.init's initialisers as no-ops. On the meta device there are no values to fill, and ``normal_`` has
    no C++ meta kernel: its Python reference loads on first use in about a second, which every stage that checks
    a model's size would pay."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_meta(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """Build the model on the meta device: parameters have shapes but no storage (no memory, no init cost)."""
    with torch.device("meta"), _no_init():
        return build_model(cfg, vocab_size)


@dataclass(frozen=True)
class ParamReport:
    """Everything ``lm params`` prints for one configuration."""

    name: str
    description: str
    model: Any
    """The model config."""
    vocab_size: int
    vocab_source: str
    counts: Counts
    """As configured."""
    untied: Counts | None
    """Families with a tie_weights option: the head with its own matrix (else None)."""
    tied: Counts | None
    """Families with a tie_weights option: the head sharing the token embedding (else None)."""
    flops_n: int | None
    """N of the FLOPs estimate (see the module docstring); None for bigram_counts."""
    flops_attention: int | None
    """12 · n_layer · n_embd · ctx (0 for families without attention)."""
    n_attention_layers: int = 0
    """Attention modules (n_layer of the FLOPs formula): n_layer for block/gpt, 1 for single/multi-head."""

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def flops_per_token(self) -> int | None:
        if self.flops_n is None or self.flops_attention is None:
            return None
        return 6 * self.flops_n + self.flops_attention

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``lm params --json``."""
        tied = getattr(self.model, "tie_weights", None)
        return {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "model": self.model.model_dump(mode="json"),
            "vocab_size": self.vocab_size,
            "vocab_source": self.vocab_source,
            "tie_weights": tied,
            **self.counts.to_dict(),
            "per_block": self.counts.blocks,
            "untied": self.untied.to_dict() if self.untied else None,
            "tied": self.tied.to_dict() if self.tied else None,
            "flops_per_token": None
            if self.flops_per_token is None
            else {
                "total": self.flops_per_token,
                "six_n": 6 * self.flops_n,
                "attention": self.flops_attention,
                "n": self.flops_n,
                "formula": "6N + 12*n_layer*n_embd*ctx (PaLM appendix B); N = every parameter except the token "
                "and position embedding tables, the LM head's matrix counted even when tied",
            },
        }


def param_report(
    cfg: ModelConfig, vocab_size: int, *, name: str = "", description: str = "", vocab_source: str = "given"
) -> ParamReport:
    """Count ``cfg`` at ``vocab_size`` (built on the meta device)."""
    model = build_meta(cfg, vocab_size)
    counts = count(model)
    untied = tied = None
    if "tie_weights" in type(cfg).model_fields:  # count the other choice too
        other = count(build_meta(cfg.model_copy(update={"tie_weights": not cfg.tie_weights}), vocab_size))
        untied, tied = (other, counts) if cfg.tie_weights else (counts, other)
    attns = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    flops_n = flops_attention = None
    if cfg.fitting == "gradient":
        matmuls = untied or counts  # the head is a matmul whether or not its matrix is shared
        flops_n = matmuls.total - matmuls.components["token_embedding"] - matmuls.components["position_embedding"]
        flops_attention = sum(12 * m.n_embd * cfg.block_size for m in attns)  # per layer: 12 · n_embd · ctx
    return ParamReport(
        name, description, cfg, vocab_size, vocab_source, counts, untied, tied, flops_n, flops_attention, len(attns)
    )


# ----------------------------------------------------------------------------------------------
# name → configuration


def resolve(
    name: str,
    *,
    params: str | Path = "params.yaml",
    tokenizers_dir: str | Path = "tokenizers",
    vocab_size: int | None = None,
) -> tuple[Any, int, str, str]:
    """A reference name or a run of ``params`` → (model config, vocab size, description, vocab source).

    References come first (they need no params file). A run's vocabulary size is read from
    ``tokenizers_dir/<its tokenizer>/stats.json``; ``vocab_size`` overrides it (and is required
    when the tokenizer has not been built yet). Raises ValueError naming the problem and the fix.
    """
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"--vocab-size must be a positive integer, got {vocab_size}")
    if name in REFERENCES:
        ref = REFERENCES[name]
        if vocab_size is not None:
            return ref.model, vocab_size, ref.description, "--vocab-size"
        return ref.model, ref.vocab_size, ref.description, "reference configuration"
    params = Path(params)
    refs = ", ".join(REFERENCES)
    if not params.exists():
        raise ValueError(
            f"unknown configuration {name!r}: not a reference ({refs}) and no params file {params} "
            f"to look runs up in (pass --params PATH)"
        )
    study = load_params(params)  # ParamsError (a ValueError) lists every problem
    if name not in study.runs:
        runs = ", ".join(study.runs) or "(none)"
        raise ValueError(f"unknown run {name!r}; runs in {params}: {runs}; references: {refs}")
    run = study.runs[name]
    tok = study.tokenizers[run.tokenizer]
    desc = f"run {name} of {params} (tokenizer {run.tokenizer}: {tok.kind} on {tok.corpus})"
    if vocab_size is not None:
        return run.model, vocab_size, desc, "--vocab-size"
    stats = Path(tokenizers_dir) / run.tokenizer / "stats.json"
    if not stats.exists():
        raise ValueError(
            f"run {name!r}: vocabulary size unknown, {stats} does not exist yet; build the tokenizer "
            f"(dvc repro tokenize@{run.tokenizer}) or pass --vocab-size N"
        )
    try:
        v = int(json.loads(stats.read_text(encoding="utf-8"))["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{stats} has no readable vocab_size ({e}); re-run dvc repro tokenize@{run.tokenizer} "
            f"or pass --vocab-size N"
        ) from None
    return run.model, v, desc, str(stats)


def report_for(name: str, **kw: Any) -> ParamReport:
    """:func:`resolve` then :func:`param_report`."""
    cfg, v, desc, source = resolve(name, **kw)
    return param_report(cfg, v, name=name, description=desc, vocab_source=source)


# ----------------------------------------------------------------------------------------------
# the table


def _shape(cfg: Any) -> str:
    keys = [("n_layer", "layers"), ("n_head", "heads"), ("n_kv_head", "KV heads"), ("n_embd", "n_embd")]
    parts = [
        f"{getattr(cfg, k):,} {label}" if label != "n_embd" else f"n_embd {cfg.n_embd:,}"
        for k, label in keys
        if getattr(cfg, k, None) is not None
    ]
    hidden = getattr(cfg, "hidden", None) or getattr(cfg, "n_hidden", None)  # the transformers' resolved width
    if hidden is not None:
        parts.append(f"{hidden:,} hidden")
    if "block_size" in type(cfg).model_fields:
        parts.insert(0, f"context {cfg.block_size:,}")
    return ", ".join(parts)


def _mb(mb: float) -> str:
    return f"{mb:,.2f}" if mb >= 0.1 else f"{mb:.3g}"  # small models: significant digits, not 0.00


def _views(r: ParamReport) -> list[tuple[str, Counts]]:
    """The columns of counts: untied and tied (the configured one starred) for a model that can tie, else one."""
    if r.tied is None or r.untied is None:
        return [("parameters", r.counts)]
    tied = r.model.tie_weights
    return [("untied head" + (" *" if not tied else ""), r.untied), ("tied head" + (" *" if tied else ""), r.tied)]


def _rows(r: ParamReport, views: list[tuple[str, Counts]]) -> list[list[str]]:
    """The table's cells: a header, a row per component (count and share per view, and one block's count), total."""
    blocks = r.counts.blocks
    same = bool(blocks) and all(b == blocks[0] for b in blocks)
    block_head = f"per block (x{len(blocks)})" if same else ("block 0" if blocks else "")
    rows = [["component"] + [v for name, _ in views for v in (name, "")] + ([block_head] if blocks else [])]
    for comp in COMPONENTS:
        if comp == "ngram" and not any(c.components[comp] for _, c in views):
            continue  # only the n-gram family stores entries: no row of zeros in every other table
        row = [LABELS[comp]]
        for _, c in views:
            row += [f"{c.components[comp]:,}", f"{100 * c.shares()[comp]:.2f} %"]
        if blocks:
            row.append(f"{blocks[0][comp]:,}" if blocks[0][comp] else "")
        rows.append(row)
    rows.append(["total"] + [v for _, c in views for v in (f"{c.total:,}", "100.00 %")])
    if blocks:
        rows[-1].append(f"{sum(blocks[0].values()):,}")
    return rows


def _aligned(rows: list[list[str]], n_views: int, blocks: bool) -> list[str]:
    """The rows as text columns; a header spans the count and share columns of its view."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    head = [rows[0][0].ljust(widths[0])]
    head += [rows[0][j].ljust(widths[j] + 2 + widths[j + 1]) for j in range(1, 1 + 2 * n_views, 2)]
    if blocks:
        head.append(rows[0][-1].rjust(widths[-1]))
    lines = ["  ".join(head).rstrip()]
    for row in rows[1:]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def _flops_lines(r: ParamReport) -> list[str]:
    if r.flops_per_token is None:
        return ["training FLOPs per token   none: bigram_counts is fitted by counting, not by gradient steps"]
    cfg = r.model
    att = f" + 12 x {r.n_attention_layers} x {cfg.n_embd:,} x {cfg.block_size:,}" if r.flops_attention else ""
    lookup = " (only lookup tables: no matmuls)" if r.flops_n == 0 else ""
    return [
        f"training FLOPs per token   6N + 12·n_layer·n_embd·ctx = 6 x {r.flops_n:,}{att} = {r.flops_per_token:,}"
        + lookup,
        "  (PaLM app. B; N = every parameter except the token and position embedding lookups, "
        "the LM head's matrix counted even when tied)",
    ]


def format_report(r: ParamReport) -> str:
    """The human-readable table of ``lm params``."""
    cfg = r.model
    lines = [
        f"{r.name}: {r.description}" if r.name else r.description,
        f"family {r.family}, vocab {r.vocab_size:,} ({r.vocab_source})" + (f", {_shape(cfg)}" if _shape(cfg) else ""),
    ]
    if r.tied is not None:
        lines[-1] += f"; head {'tied' if cfg.tie_weights else 'untied'} as configured"
    views = _views(r)
    lines += ["", *_aligned(_rows(r, views), len(views), bool(r.counts.blocks))]
    if r.tied is not None:
        lines.append("(* as configured)")
    sizes = "   ".join(
        f"{name.rstrip(' *')}: " + ", ".join(f"{_mb(mb)} MB {dt}" for dt, mb in c.megabytes().items())
        for name, c in views
    )
    lines += ["", f"size (parameters only, 1 MB = 2**20 bytes)   {sizes}", *_flops_lines(r)]
    return "\n".join(lines)
