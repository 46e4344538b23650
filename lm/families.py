"""The model families' configs: one pydantic model per family, and the registry that names them.

A family is two classes: its config here (torch-free, so ``lm check-params`` validates a params file without
importing torch) and its model in ``lm/models/`` (which names the config as ``Config``). Defining a subclass of
:class:`ModelConfig` that narrows ``family`` to a literal registers the family with params validation, its error
messages and every part of the study that asks what a family is (``fitting``, ``context``, ``block_size``).
docs/extending.md has the recipe.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from lm.strict import Strict

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
    no gradient steps; the baseline LLMfromScratch compares its model with."""

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
    """Biases in the fusion Linears before each BatchNorm: true as the Language modeling journey's WaveNet; false as
    makemore lecture 5's (BatchNorm's shift makes them redundant). Their parameter counts are in lm/references.py."""

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
    """Biases in the query/key/value projection (GPT-2: true; Raschka's config and the Language modeling
    journey's GPT: false)."""
    head_bias: bool = False
    """A bias in the LM head (the Language modeling journey's Shakespeare GPT has one; GPT-2 does not)."""
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
