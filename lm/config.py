"""Typed, validated study parameters: ``params.yaml`` → frozen pydantic models.

Every stage loads the whole file through :func:`load_params` before doing any work, so a
typo anywhere fails every stage fast, with one line per problem::

    params.yaml: 2 problems
      runs.names-mlp.model.n_embd: got -5; must be >= 1
      runs.names-mlp.trian: unknown key 'trian'; allowed: model, tokenizer, train

The library never reads ``params.yaml`` by itself: stages pass the path in.
Model configurations live here too (not next to the models) so that validating params never
imports torch: ``lm check-params`` answers in well under a second.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
"""Corpus, tokenizer and run names: they become DVC stage keys, file names and MLflow run names."""


class ParamsError(ValueError):
    """Raised when a params file is unreadable or invalid; ``problems`` has one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n" + "\n".join(f"  {p}" for p in problems))


class Strict(BaseModel):
    """Base: unknown keys are errors, instances are immutable, docstrings describe fields, and no float
    setting may be NaN or infinite (YAML's .nan / .inf: e.g. an infinite weight_decay would train NaNs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------
# corpora


class SplitConfig(Strict):
    """Fractions of the corpus per split; they must sum to 1."""

    train: float = Field(gt=0, lt=1)
    """Fraction used for training (names: of the names; text: the first part of the text)."""
    val: float = Field(gt=0, lt=1)
    """Fraction used for validation (text: the part right after train)."""
    test: float = Field(default=0.0, ge=0, lt=1)
    """Fraction held out for the final test (0 for the text corpora, as nanoGPT)."""

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class CleanConfig(Strict):
    """Text cleaning applied after download; everything not named here is kept byte for byte."""

    strip_bom: bool = True
    """Remove a leading UTF-8 byte-order mark."""
    normalize_newlines: bool = True
    """Turn CRLF (and lone CR) line ends into LF."""
    strip_gutenberg: bool = True
    """Drop a Project Gutenberg header (up to its '*** START OF' line) and footer (from '*** END OF'), where present."""
    strip: bool = False
    """Strip leading and trailing whitespace of the whole text after the above."""


class CorpusConfig(Strict):
    """One corpus: where it comes from, how it is cleaned and split."""

    url: str = Field(pattern=r"^https?://\S+$")
    """Pinned download URL (http or https). A mirror folder (env LM_DATA_MIRROR) is tried first."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Expected sha256 (64 lowercase hex digits) of the downloaded bytes, before cleaning."""
    filename: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    """File name of the raw download, also the name looked up in the mirror folder."""
    format: Literal["lines", "text"]
    """'lines': one example per line (split by line, shuffled with the seed); 'text': continuous text, split
    contiguously."""
    split: SplitConfig
    """Split fractions."""
    clean: CleanConfig = CleanConfig()
    """Cleaning options."""


# ----------------------------------------------------------------------------------------------
# tokenizers


class TokenizerConfig(Strict):
    """A Hugging Face `tokenizers` tokenizer trained on one corpus's training split."""

    corpus: str
    """Name of the corpus (a key of `corpora`) the tokenizer is trained on."""
    kind: Literal["char", "bpe"]
    """'char': one token per character of the training split (plus the '.' boundary of 'lines' corpora);
    'bpe': byte-level BPE."""
    vocab_size: int | None = Field(default=None, ge=257, le=65536)
    """BPE only: target vocabulary size, at least 257 (the 256-byte alphabet plus one merge)."""
    oov: Literal["error", "unk"] = "error"
    """Char only: a val/test character missing from the training characters is an error ('error') or becomes
    an [UNK] token ('unk', counted in stats)."""

    @model_validator(mode="after")
    def _kind_fields(self) -> TokenizerConfig:
        if self.kind == "bpe" and self.vocab_size is None:
            raise ValueError("kind 'bpe' needs vocab_size (an integer >= 257)")
        if self.kind == "char" and self.vocab_size is not None:
            raise ValueError("kind 'char' takes no vocab_size (the vocabulary is the training characters)")
        return self


# ----------------------------------------------------------------------------------------------
# models: the base every family's config derives from, then one config per family


FAMILY_CONFIGS: dict[str, type[ModelConfig]] = {}
"""Family name → config class, filled as ModelConfig subclasses are defined (in definition order)."""


def families() -> tuple[str, ...]:
    """Every registered family, in definition order."""
    return tuple(FAMILY_CONFIGS)


class ModelConfig(Strict):
    """Base of every family's config. A subclass that narrows ``family`` to a literal registers the family;
    its model class (``lm.models``) names the config as ``Config``.

    Besides its fields, a family declares here, as class variables, what the rest of the study needs to know
    about it without importing torch (the model class declares the rest: KV cache, component map):
    ``fitting`` and ``context`` below, and ``block_size``, the context length in tokens (a field, or a
    class constant where it is fixed, as the bigrams' 1)."""

    family: str
    """The family's name (the registry key, ``runs.<run>.model.family`` in params.yaml)."""

    fitting: ClassVar[Literal["gradient", "counting"]] = "gradient"
    """'gradient': trained by the optimizer for train.max_steps steps; 'counting': fitted by one counting
    pass over the training split (no steps, no optimizer)."""
    context: ClassVar[Literal["fixed", "window"]] = "window"
    """'fixed': every prediction reads exactly the previous block_size tokens, left-padded with id 0 inside
    forward, so any input length works; 'window': the model attends over its input, at most block_size."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        names = get_args(cls.model_fields["family"].annotation)
        if len(names) != 1:
            return  # an abstract intermediate class: no family of its own
        if not hasattr(cls, "block_size") and "block_size" not in cls.model_fields:
            raise TypeError(f"{cls.__name__} must declare block_size (a field, or a ClassVar if it is fixed)")
        if names[0] in FAMILY_CONFIGS and FAMILY_CONFIGS[names[0]].__qualname__ != cls.__qualname__:
            raise TypeError(
                f"family {names[0]!r} is declared twice: {FAMILY_CONFIGS[names[0]].__name__}, {cls.__name__}"
            )
        FAMILY_CONFIGS[names[0]] = cls

    @classmethod
    def parse(cls, value: Any) -> ModelConfig:
        """Validate a ``model`` mapping as its family's config (chosen by its ``family`` key)."""
        if isinstance(value, ModelConfig):
            return value
        family = value.get("family") if isinstance(value, dict) else None
        if not isinstance(family, str) or family not in FAMILY_CONFIGS:  # a list or dict is no family name
            raise _family_error(value)
        return FAMILY_CONFIGS[family].model_validate(value)


def _family_error(value: Any) -> ValidationError:
    """The error of a ``model`` mapping whose family is missing or unknown, located at ``model.family``."""
    allowed = ", ".join(families())
    if not isinstance(value, dict):
        error = PydanticCustomError(
            "model_mapping", "must be a mapping with a 'family' key ({allowed})", {"allowed": allowed}
        )
        return ValidationError.from_exception_data("model", [InitErrorDetails(type=error, loc=(), input=value)])
    if "family" not in value:
        return ValidationError.from_exception_data(
            "model", [InitErrorDetails(type="missing", loc=("family",), input=value)]
        )
    error = PydanticCustomError("unknown_family", "must be one of {allowed}", {"allowed": allowed})
    return ValidationError.from_exception_data(
        "model", [InitErrorDetails(type=error, loc=("family",), input=value["family"])]
    )


class BigramCountsConfig(ModelConfig):
    """Count next-token frequencies and normalise (no gradient steps)."""

    family: Literal["bigram_counts"]
    fitting: ClassVar = "counting"
    context: ClassVar = "fixed"
    block_size: ClassVar[int] = 1
    smoothing: float = Field(default=1.0, ge=0)
    """Add-k smoothing added to every count before normalising (1.0 = Laplace, as makemore)."""


class NGramConfig(ModelConfig):
    """Interpolated Kneser–Ney n-gram of order n (Kneser & Ney 1995; Chen & Goodman 1998): counted in one pass,
    no gradient steps; the baseline seed 002 compares its model with."""

    family: Literal["ngram"]
    fitting: ClassVar = "counting"
    context: ClassVar = "fixed"
    order: int = Field(default=3, ge=2, le=16)
    """n: each prediction reads the previous n - 1 tokens (2 is a bigram). The packed n-gram keys must fit in 63
    bits, vocab_size ** order < 2 ** 63 (char vocabularies: order <= 10; 512 tokens: <= 6)."""
    discount: float | None = Field(default=None, gt=0, lt=1)
    """None: modified Kneser–Ney, three discounts per order (for counts 1, 2 and 3+) estimated from that
    order's count-of-counts (Chen & Goodman 1998, eq. 26); a number D in (0, 1): one absolute discount for
    every count and order (interpolated Kneser–Ney as Kneser & Ney 1995)."""

    @property
    def block_size(self) -> int:
        """The context length: order - 1."""
        return self.order - 1


class BigramNNConfig(ModelConfig):
    """The bigram table learned by gradient descent: logits = one_hot(idx) @ W."""

    family: Literal["bigram_nn"]
    context: ClassVar = "fixed"
    block_size: ClassVar[int] = 1


class MLPConfig(ModelConfig):
    """Bengio et al. 2003: concatenated embeddings of the previous `block_size` tokens → tanh hidden layer → logits."""

    family: Literal["mlp"]
    context: ClassVar = "fixed"
    block_size: int = Field(default=3, ge=1, le=1024)
    """Context length: how many previous tokens feed each prediction."""
    n_embd: int = Field(default=10, ge=1)
    """Embedding dimension per token."""
    n_hidden: int = Field(default=200, ge=1)
    """Width of the tanh hidden layer."""
    batchnorm: bool = False
    """BatchNorm before tanh (Ioffe & Szegedy 2015); the Linear before it then has no bias."""
    bn_momentum: float = Field(default=0.1, gt=0, le=1)
    """BatchNorm's running-statistics update rate (PyTorch's default 0.1; makemore part 3 uses 0.001, which
    averages the eval-time statistics over ~1000 batches instead of ~10)."""


class WaveNetConfig(ModelConfig):
    """Hierarchical fusion of neighbour pairs (van den Oord et al. 2016), as Linear+BatchNorm+tanh levels."""

    family: Literal["wavenet"]
    context: ClassVar = "fixed"
    block_size: int = Field(default=8, ge=2, le=1024)
    """Context length; a power of two (one fusion level per halving)."""
    n_embd: int = Field(default=24, ge=1)
    """Embedding dimension per token."""
    n_hidden: int = Field(default=128, ge=1)
    """Width of every fusion level."""
    bias: bool = True
    """Biases in the fusion Linears before each BatchNorm: true as seed 000's 175,767-param net; false as
    makemore part 5's 76,579-param net (BatchNorm's shift makes them redundant)."""

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (2, 4, 8, 16, ...), got {v}")
        return v


class SingleHeadConfig(ModelConfig):
    """Token + position embeddings → one causal self-attention head → logits."""

    family: Literal["single_head"]
    block_size: int = Field(default=32, ge=1, le=131_072)
    """Context length (attention window)."""
    n_embd: int = Field(default=64, ge=1)
    """Embedding dimension; also the head size."""


class MultiHeadConfig(ModelConfig):
    """Several causal heads concatenated + output projection."""

    family: Literal["multi_head"]
    block_size: int = Field(default=32, ge=1, le=131_072)
    """Context length (attention window)."""
    n_embd: int = Field(default=64, ge=1)
    """Embedding dimension; split evenly across heads."""
    n_head: int = Field(default=4, ge=1)
    """Number of heads; must divide n_embd."""

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class BlockConfig(MultiHeadConfig):
    """One transformer block: attention + feed-forward, residuals, LayerNorm."""

    family: Literal["block"]  # type: ignore[assignment]
    norm: Literal["pre", "post"] = "pre"
    """'pre': LayerNorm before each sublayer (GPT-2); 'post': after the residual add (Vaswani et al. 2017)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on attention weights and residual branches during training."""


class GPTConfig(BlockConfig):
    """Decoder-only transformer: a stack of blocks, a final LayerNorm, an LM head (GPT-2 style)."""

    family: Literal["gpt"]  # type: ignore[assignment]
    n_layer: int = Field(default=4, ge=1)
    """Number of transformer blocks."""
    bias: bool = True
    """Biases in the attention output projection, feed-forward Linears and LayerNorms."""
    qkv_bias: bool = False
    """Biases in the query/key/value projection (GPT-2: true; Raschka's config and seed 000: false)."""
    head_bias: bool = False
    """A bias in the LM head (seed 000's 10,788,929-param model has one; GPT-2 does not)."""
    tie_weights: bool = False
    """Share the LM head weight with the token embedding (Press & Wolf 2017)."""
    pos: Literal["learned", "sinusoidal", "rope"] = "learned"
    """Positions: learned table (GPT-2), fixed sinusoids added to the embeddings (Vaswani et al. 2017), or
    rotary embeddings applied to queries and keys in every layer (Su et al. 2021, 'RoFormer'; no table)."""
    rope_base: float = Field(default=10000.0, gt=1)
    """Rotary only: the base θ of the rotation frequencies θ^(-2i/head_size) (LLaMA 1-2: 10,000; 3: 500,000)."""
    norm_class: Literal["layernorm", "rmsnorm"] = "layernorm"
    """LayerNorm (Ba et al. 2016; with a shift when ``bias``) or RMSNorm (Zhang & Sennrich 2019: scale only, no
    mean subtraction), for every norm of the model."""
    norm_eps: float = Field(default=1e-5, gt=0, lt=1)
    """The norms' epsilon (PyTorch's LayerNorm and LLaMA's RMSNorm: 1e-5; Hugging Face's LlamaConfig default: 1e-6)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Feed-forward: Linear → GELU → Linear (GPT-2), or SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""
    n_hidden: int | None = Field(default=None, ge=1)
    """Feed-forward hidden width. None: 4·n_embd for 'gelu'; for 'swiglu', LLaMA's rule: 2/3 of 4·n_embd
    rounded up to a multiple of ``multiple_of`` (so the three matrices cost about what GELU's two do)."""
    multiple_of: int = Field(default=256, ge=1)
    """SwiGLU with n_hidden None: round the hidden width up to a multiple of this (LLaMA: 256)."""
    n_kv_head: int | None = Field(default=None, ge=1)
    """Key/value heads (grouped-query attention, Ainslie et al. 2023): each serves n_head / n_kv_head query
    heads. None: n_head (multi-head attention); 1: multi-query attention."""

    @model_validator(mode="after")
    def _shape(self):
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"rotary positions rotate channel pairs: the head size n_embd / n_head = {self.n_embd // self.n_head} "
                "must be even"
            )
        return self

    @property
    def hidden(self) -> int:
        """The feed-forward hidden width (``n_hidden``, or its default for ``mlp``)."""
        if self.n_hidden is not None:
            return self.n_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return self.multiple_of * -(-int(2 * 4 * self.n_embd / 3) // self.multiple_of)

    @property
    def kv_heads(self) -> int:
        """The key/value heads (``n_kv_head``, or n_head)."""
        return self.n_kv_head or self.n_head


class LlamaConfig(GPTConfig):
    """LLaMA's transformer (Touvron et al. 2023, 'LLaMA' and 'Llama 2'): the GPT with RMSNorm before each sublayer,
    rotary positions, a SwiGLU feed-forward, no biases, and optionally grouped-query attention (``n_kv_head``).
    The switches are GPTConfig's; here they are fixed to LLaMA's choices."""

    family: Literal["llama"]  # type: ignore[assignment]
    norm: Literal["pre"] = "pre"  # type: ignore[assignment]
    """LLaMA normalises before each sublayer (and once more before the head)."""
    pos: Literal["rope"] = "rope"  # type: ignore[assignment]
    """Rotary positions."""
    norm_class: Literal["rmsnorm"] = "rmsnorm"  # type: ignore[assignment]
    """RMSNorm."""
    mlp: Literal["swiglu"] = "swiglu"  # type: ignore[assignment]
    """SwiGLU feed-forward."""
    bias: Literal[False] = False  # type: ignore[assignment]
    """No biases anywhere."""
    qkv_bias: Literal[False] = False  # type: ignore[assignment]
    """No query/key/value biases."""
    head_bias: Literal[False] = False  # type: ignore[assignment]
    """No LM head bias."""


def _known_families(names: list[str]) -> list[str]:
    if bad := [f for f in names if f not in FAMILY_CONFIGS]:
        raise ValueError(f"unknown families {bad}; must be among {', '.join(families())}")
    return names


FamilyNames = Annotated[list[str], AfterValidator(_known_families)]
"""A list of registered family names."""


# ----------------------------------------------------------------------------------------------
# training and runs


class TrainConfig(Strict):
    """Optimisation settings of one run (ignored by bigram_counts, which is fitted by counting)."""

    seed: int = Field(default=1337, ge=0)
    """Seeds model init and batch sampling."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """'auto' picks cuda, then mps, then cpu."""
    max_steps: int = Field(default=1000, ge=0)
    """Number of optimizer steps (bigram_counts ignores it: one counting pass over the training split)."""
    batch_size: int = Field(default=32, ge=1)
    """Examples per step. Text: windows of block_size tokens. Names: for fixed-context families (bigram, MLP,
    WaveNet), (context, target) examples drawn uniformly from every position of every name (makemore's batches);
    for attention families, whole names."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW (Loshchilov & Hutter 2019) or plain SGD (as the makemore lectures)."""
    lr: float = Field(default=1e-3, gt=0, le=100)
    """Peak learning rate."""
    min_lr: float = Field(default=0.0, ge=0)
    """Learning rate at the end of the cosine decay."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    """After warmup: cosine decay to min_lr, step decay by step_gamma at step_at, or constant."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps from 0 to lr."""
    step_at: list[float] = [0.75]
    """'step' schedule: fractions of max_steps at which lr is multiplied by step_gamma."""
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    """'step' schedule: multiplier at each step_at."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay on 2-D weights (not biases, norms or embeddings' gains)."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1 (or SGD momentum)."""
    beta2: float = Field(default=0.99, ge=0, lt=1)
    """AdamW beta2."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    eval_interval: int = Field(default=100, ge=1)
    """Steps between evaluations on the fixed val subset (and the last step)."""
    eval_batches: int = Field(default=8, ge=1)
    """Batches in the fixed val subset used during training (the evaluate stage uses the whole split)."""
    keep: Literal["best", "last"] = "best"
    """Which weights the checkpoint holds: 'best', those of the evaluation with the lowest val estimate (model
    selection on the fixed val subset, as nanoGPT keeps its best checkpoint; train.json records its step), or
    'last', those after the last step. The curve keeps every evaluation either way."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype for the forward pass (weights stay float32)."""
    compile: bool | Literal["auto"] = "auto"
    """Wrap the model in torch.compile. 'auto': on CUDA only, where it was measured faster (same 5000 steps of the
    seed GPT in 83 s instead of 94 s on an H200, compile included); on CPU it was measured slower (reports/bench.md)."""
    adamw_impl: Literal["auto", "foreach", "fused", "for-loop"] = "auto"
    """AdamW kernel: multi-tensor 'foreach', single-kernel 'fused' (CPU and CUDA), or the plain per-parameter loop;
    the same update up to rounding (bench/train.py measures them). 'auto': fused on CUDA (nanoGPT), else foreach."""
    tf32: bool = True
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (nanoGPT's setting; ~3 significant
    digits per product, sums in float32). No effect on CPU or MPS."""
    threads: int = Field(default=0, ge=0)
    """Intra-op CPU threads for this run (torch.set_num_threads); 0 keeps torch's default (one per core)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (per process): batch_size is the global batch, split over
    processes x grad_accum, so the update does not depend on how many processes share it."""
    health_every: int = Field(default=0, ge=0)
    """Training health (makemore part 4), recorded every this many steps and at the first and last: the log10
    update-to-data ratio of every weight matrix (also MLflow metrics ``ud/<weight>``), and at the first and last
    step histograms of activations (tanh: with the saturated share) and weight gradients; written to
    models/<run>/health.json for the report. 0 (default) records nothing: it costs a copy of the weights per record."""
    checkpoint_interval: int = Field(default=250, ge=0)
    """Save the resumable training state (model, optimizer, step, RNGs, curve) every this many steps,
    so a killed run continues where it stopped; 0 saves only on Ctrl-C / SIGTERM."""

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if any(not 0 < f < 1 for f in self.step_at):
            raise ValueError(f"step_at fractions must lie in (0, 1), got {self.step_at}")
        return self


class RunConfig(Strict):
    """One experiment: a model family trained on one tokenized corpus."""

    tokenizer: str
    """Name of the tokenizer (a key of `tokenizers`); it also fixes the corpus."""
    model: SerializeAsAny[ModelConfig]
    """Model family and its shape; `family` picks the config class (any registered ModelConfig subclass)."""
    train: TrainConfig = TrainConfig()
    """Optimisation settings."""

    @field_validator("model", mode="wrap")
    @classmethod
    def _family_config(cls, value: Any, handler: Any) -> ModelConfig:
        return ModelConfig.parse(value)

    @model_validator(mode="after")
    def _gradient_families_take_steps(self) -> RunConfig:
        if self.model.fitting == "gradient" and self.train.max_steps == 0:
            raise ValueError(
                f"family {self.model.family!r} is trained by gradient descent: train.max_steps must be >= 1"
            )
        return self


class EvaluateConfig(Strict):
    """Settings of the evaluate stage (shared by every run)."""

    batch_size: int = Field(default=64, ge=1)
    """Sequences per forward pass when scoring a whole split."""
    seed: int = Field(default=1337, ge=0)
    """Seed for sampling."""
    num_names: int = Field(default=20, ge=0)
    """Samples drawn for 'lines' corpora."""
    num_passages: int = Field(default=3, ge=0)
    """Passages drawn for 'text' corpora."""
    passage_chars: int = Field(default=500, ge=1)
    """Length of each text passage, in characters."""
    temperature: float = Field(default=1.0, gt=0)
    """Softmax temperature for sampling."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample only from the k most likely tokens (None: all)."""
    quality_prompts: int = Field(default=8, ge=0)
    """Text corpora: fixed val prompts whose continuations (greedy and sampled) are scored against the true ones
    (BLEU, chrF, distinct-n, 8-gram copy rate; lm/inspection.py); 0 turns it off."""
    prompt_chars: int = Field(default=64, ge=1)
    """Characters of each quality prompt."""
    continuation_chars: int = Field(default=100, ge=8)
    """Characters generated after each prompt and compared with the true continuation."""


class Anchor(Strict):
    """A published number the study should meet with one of its runs (STUDY.md, 'Published numbers')."""

    run: str
    """The run that reproduces the source's configuration (a key of `runs`)."""
    metric: Literal["val/loss", "test/loss", "val/bpc", "test/bpc"] = "val/loss"
    """Which number of the run's metrics JSON (whole split) compares with `target`."""
    target: float = Field(gt=0)
    """The published number: met when ours is at or below it."""
    source: str = Field(min_length=1)
    """Where the number comes from (seed and lecture, or repository)."""
    steps: int | None = Field(default=None, ge=1)
    """The source's training length: a run with fewer steps is reported as partial, not as a miss."""


class PerTokenReference(Strict):
    """A perplexity published per token of a tokenizer we do not have (seed 002's Oz 42.7): the report sets it
    beside every run of the corpus in bits per character, the only number that compares across tokenizers."""

    corpus: str
    """The corpus the number is about (a key of `corpora`)."""
    ppl: float = Field(gt=1)
    """The published per-token perplexity."""
    source: str = Field(min_length=1)
    """Where it comes from, and what is unknown about it."""


class ReportConfig(Strict):
    """Settings of the report stage."""

    title: str = "From a bigram table to a GPT"
    """Title of reports/README.md."""
    samples_per_run: int = Field(default=5, ge=0)
    """Samples shown per run in the report."""
    ablation: list[str] = []
    """Runs of one corpus in ladder order, each changing one thing from the row before: the report's table
    "What each change buys" (params, val loss, bpc, and the change in each against the previous row)."""
    attention_offset: int = Field(default=0, ge=0)
    """Where the attention grids' passage starts: the first line start at or after this character of each corpus's
    val text (the same passage for every run of a corpus)."""
    anchors: list[Anchor] = []
    """Published numbers with the run that reproduces each: the report's table "Seed anchors" (ours, the target,
    the difference, met or not, partial when the run trained fewer steps than the source)."""
    per_token: list[PerTokenReference] = []
    """Per-token perplexities of unknown tokenizers, compared in bits per character."""
    embedding_families: FamilyNames = ["mlp", "wavenet"]
    """Families whose char-level token embeddings the report compares (cosine similarity, seed 000 figs. 3, 5)."""


class TrackingConfig(Strict):
    """MLflow tracking of every stage instance (lm/tracking.py). The server is not a param: it is the
    environment's MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db (see README, 'Compare runs in MLflow')."""

    enabled: bool = True
    """Log every stage instance as an MLflow run; false runs the pipeline untracked (no mlflow import)."""
    required: bool = True
    """An unreachable tracking store fails the stage before any work; false warns and runs the stage untracked.
    Once a run is open, a failing store is always a warning: finished work is never lost over logging."""
    experiment: str = Field(default="lm-ladder", min_length=1, max_length=200)
    """MLflow experiment that holds the study's runs: one per study (presets/tiny.yaml logs to lm-ladder-tiny)."""
    log_checkpoints: FamilyNames = ["gpt"]
    """Families whose model.safetensors the train stage logs as an artifact ([]: none; config.json is always logged)."""


class StudyConfig(Strict):
    """The whole of params.yaml."""

    seed: int = Field(default=1337, ge=0)
    """Study seed: shuffles the names split."""
    corpora: dict[str, CorpusConfig]
    """Corpora by name."""
    tokenizers: dict[str, TokenizerConfig]
    """Tokenizers by name."""
    runs: dict[str, RunConfig] = {}
    """Experiments by name: one train and one evaluate stage each."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluate-stage settings."""
    report: ReportConfig = ReportConfig()
    """Report-stage settings."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking settings (every stage)."""

    @field_validator("corpora", "tokenizers", "runs")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not NAME_RE.match(k)]
        if bad:
            raise ValueError(f"names {bad} must match {NAME_RE.pattern} (lowercase letters, digits, '-', '_')")
        return v

    @model_validator(mode="after")
    def _references(self) -> StudyConfig:
        problems = []
        for name, tok in self.tokenizers.items():
            if tok.corpus not in self.corpora:
                problems.append(f"tokenizers.{name}.corpus: got {tok.corpus!r}; must be one of {sorted(self.corpora)}")
        for name, run in self.runs.items():
            if run.tokenizer not in self.tokenizers:
                problems.append(
                    f"runs.{name}.tokenizer: got {run.tokenizer!r}; must be one of {sorted(self.tokenizers)}"
                )
        for i, name in enumerate(self.report.ablation):
            if name not in self.runs:
                problems.append(f"report.ablation[{i}]: got {name!r}; must be a run of `runs`")
        for i, anchor in enumerate(self.report.anchors):
            if anchor.run not in self.runs:
                problems.append(f"report.anchors[{i}].run: got {anchor.run!r}; must be a run of `runs`")
        for i, ref in enumerate(self.report.per_token):
            if ref.corpus not in self.corpora:
                problems.append(
                    f"report.per_token[{i}].corpus: got {ref.corpus!r}; must be one of {sorted(self.corpora)}"
                )
        if problems:
            raise ParamsError("params", problems)
        return self

    def corpus_of(self, run: str) -> CorpusConfig:
        return self.corpora[self.tokenizers[self.runs[run].tokenizer].corpus]


# ----------------------------------------------------------------------------------------------
# loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):  # a list or mapping as a key: construct_mapping reports it as YAML
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _segment(key: Any) -> str:
    """One key of a problem's path as printed: quoted where it would break the line or the dots ('a.b', '\\n', '')."""
    s = str(key)
    if isinstance(key, str) and (not s or not s.isprintable() or "." in s or s != s.strip()):
        return repr(s)
    return s


def _format_error(err: dict[str, Any]) -> str:
    keep = err["loc"]
    loc = [str(p) for p in keep]
    path = ".".join(map(_segment, keep)) or "<top level>"
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return f"{path}: unknown key {loc[-1]!r}; check the spelling against the documented keys (lm/config.py)"
    if kind == "missing":
        return f"{path}: missing; this key is required"
    msg = msg.removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:]
    if isinstance(value, (dict, list)):  # a whole section: the message names the values
        return f"{path}: {msg}"
    return f"{path}: got {value!r}; {msg}"


def parse_params(data: Any, source: str = "params") -> StudyConfig:
    """Validate an already-parsed params mapping; raise ParamsError listing every problem."""
    if not isinstance(data, dict):
        raise ParamsError(
            source,
            [f"<top level>: got {type(data).__name__}; must be a mapping of sections (corpora, tokenizers, runs, ...)"],
        )
    try:
        return StudyConfig.model_validate(data)
    except ParamsError as e:
        raise ParamsError(source, e.problems) from None
    except ValidationError as e:
        problems = []
        for err in e.errors():
            # A ParamsError raised inside a validator arrives wrapped in a value_error.
            ctx_err = err.get("ctx", {}).get("error")
            if isinstance(ctx_err, ParamsError):
                problems.extend(ctx_err.problems)
            else:
                problems.append(_format_error(err))
        raise ParamsError(source, problems) from None


def load_params(path: str | Path = "params.yaml") -> StudyConfig:
    """Read and validate a params file; raise ParamsError (one line per problem) if anything is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(str(path), [f"file not found; pass an existing params file (cwd: {Path.cwd()})"]) from None
    except UnicodeDecodeError as e:
        raise ParamsError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ParamsError(str(path), [f"invalid YAML: {' '.join(str(e).split())}"]) from None
    return parse_params(data, str(path))
