"""Typed, validated study parameters: ``params.yaml`` → frozen pydantic models.

Every stage loads the whole file through :func:`load_params` before doing any work, so a
typo anywhere fails every stage fast, with one line per problem::

    params.yaml: 2 problems
      runs.names-mlp.model.n_embd: got -5; must be >= 1
      runs.names-mlp.trian: unknown key 'trian'; allowed: model, tokenizer, train

The library never reads ``params.yaml`` by itself: stages pass the path in. The model families' configs are
in :mod:`lm.families` (torch-free too, so ``lm check-params`` answers in well under a second).
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from lm.families import FamilyNames, ModelConfig
from lm.references import PUBLISHED, Published
from lm.strict import Strict

NAME_MAX = 64
NAME_RE = re.compile(rf"^[a-z0-9][a-z0-9_-]{{0,{NAME_MAX - 1}}}$")
"""Corpus, tokenizer and run names: they become DVC stage keys, file names (with prefixes and suffixes: a file
name is at most 255 bytes) and MLflow run names."""


class ParamsError(ValueError):
    """Raised when a params file is unreadable or invalid; ``problems`` has one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n" + "\n".join(f"  {p}" for p in problems))


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
    format: Literal["lines", "text", "labelled"]
    """'lines': one example per line (split by line, shuffled with the seed); 'text': continuous text, split
    contiguously; 'labelled': one example per line, ``label<TAB>text`` (the text may hold more tabs), for
    classification, split stratified by label (lm/data.py)."""
    split: SplitConfig
    """Split fractions."""
    clean: CleanConfig = CleanConfig()
    """Cleaning options."""
    labels: list[str] | None = Field(default=None, min_length=2)
    """'labelled' only: the labels a line may carry, in class-index order (the first is class 0)."""
    balance: bool = False
    """'labelled' only: down-sample every label to the rarest one's count (with the study seed) before splitting,
    as the SMS spam chapter of Raschka's book does."""

    @model_validator(mode="after")
    def _labelled_fields(self) -> CorpusConfig:
        if self.format == "labelled":
            if not self.labels or len(set(self.labels)) != len(self.labels):
                raise ValueError("format 'labelled' needs labels: a list of two or more distinct labels")
            if bad := [x for x in self.labels if not x or "\t" in x or x != x.strip()]:
                raise ValueError(f"labels must be non-empty, without tabs or surrounding spaces; got {bad}")
        elif self.labels is not None or self.balance:
            raise ValueError(f"labels and balance belong to format 'labelled'; this corpus is {self.format!r}")
        return self


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
# training and runs


class Warmup(Strict):
    """A linear ramp over the first steps of training: from `start` at step 0 to the run's full value at `steps`."""

    start: int = Field(ge=1)
    """The value at the first step (a batch size, or a window length in tokens)."""
    steps: int = Field(ge=1)
    """Steps over which the value grows linearly to the full one."""


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
    optimizer: Literal["adamw", "sgd", "muon"] = "adamw"
    """AdamW (Loshchilov & Hutter 2019), plain SGD (as the makemore lectures), or 'muon': Muon (Jordan et al. 2024)
    on the hidden matrices (the attention and feed-forward weights the family declares) and AdamW on the rest
    (embeddings, head, norms, biases), lm/muon.py."""
    lr: float = Field(default=1e-3, gt=0, le=100)
    """Peak learning rate (with 'muon': AdamW's, for the parameters Muon does not train)."""
    muon_lr: float | None = Field(default=None, gt=0, le=10)
    """optimizer 'muon' only: peak learning rate of the hidden matrices (default 0.02, the Muon post's); it follows
    the same warmup and decay as lr, scaled by muon_lr / lr."""
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
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Autocast dtype for the forward pass (weights stay float32). 'auto': bfloat16 where the hardware multiplies
    it natively (CUDA; x86 CPUs with AVX512_BF16 or AMX), float32 elsewhere, where bf16 matmuls are ~100x slower
    (lm/precision.py). train.json, the metrics and MLflow record the dtype it resolved to."""
    compile: bool | Literal["auto"] = "auto"
    """Wrap the model in torch.compile. 'auto': on CUDA only; on a CPU it was measured slower, compile time included
    (docs/performance.md, reports/bench.md)."""
    adamw_impl: Literal["auto", "foreach", "fused", "for-loop"] = "auto"
    """AdamW kernel: multi-tensor 'foreach', single-kernel 'fused' (CPU and CUDA), or the plain per-parameter loop;
    the same update up to rounding (bench/train_speed.py measures them). 'auto': fused on CUDA (nanoGPT), else
    foreach."""
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
    time_budget_s: float | None = Field(default=None, gt=0)
    """Train for this many seconds of training steps (evaluations excluded) instead of max_steps, which stays a
    ceiling: after warmup, the lr's decay follows the share of the budget elapsed rather than of max_steps, so the
    run ends annealed exactly when its time is up (bench.train_speed --race, lever 'time-budget'). The number of
    steps then depends on the machine's speed, so such a run is not reproducible bit for bit: the ladder's runs
    leave it unset."""
    batch_warmup: Warmup | None = None
    """Batch-size warm-up (GPT-3, Brown et al. 2020, section 2.3): the batch grows linearly from ``start`` to
    batch_size over ``steps`` steps (rounded down to a multiple of the processes x grad_accum), so the first updates
    are cheaper and more frequent."""
    seq_warmup: Warmup | None = None
    """Sequence-length warm-up (Li et al. 2022, "The Stability-Efficiency Dilemma"), text corpora only: the training
    windows grow linearly from ``start`` tokens to the model's block_size over ``steps`` steps, so the first steps
    are cheaper."""

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g})")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if any(not 0 < f < 1 for f in self.step_at):
            raise ValueError(f"step_at fractions must lie in (0, 1), got {self.step_at}")
        if self.batch_warmup is not None and self.batch_warmup.start > self.batch_size:
            raise ValueError(
                f"batch_warmup.start ({self.batch_warmup.start}) must not exceed batch_size ({self.batch_size})"
            )
        if self.muon_lr is not None and self.optimizer != "muon":
            raise ValueError(f"muon_lr is the learning rate of optimizer 'muon'; this run's is {self.optimizer!r}")
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
        warmup = self.train.seq_warmup
        if warmup is not None and self.model.context == "window" and warmup.start > self.model.block_size:
            # (a fixed-context family's windows are not its block_size: the training loop checks those)
            raise ValueError(
                f"train.seq_warmup.start ({warmup.start}) must not exceed model.block_size ({self.model.block_size})"
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
    attention_offset: int = Field(default=0, ge=0)
    """Where the attention grids' passage starts: the first line start at or after this character of each corpus's
    val text (the same passage for every run of a corpus)."""


def _published_key(key: str, units: tuple[str, ...], need_metric: bool = False) -> str:
    """`key` if lm/references.py has it, in one of `units` (and, with `need_metric`, comparable with a run's metrics
    JSON); else a ValueError listing the keys that would do."""
    fits = [k for k, p in PUBLISHED.items() if p.unit in units and (p.metric is not None or not need_metric)]
    if key not in fits:
        raise ValueError(f"must be a published number of lm/references.py in {'/'.join(units)}: one of {fits}")
    return key


class Anchor(Strict):
    """A published loss the study should meet with one of its runs: the report's "Source anchors" table."""

    run: str
    """The run that reproduces the source's configuration (a key of `runs`)."""
    published: str
    """The published number (a key of lm/references.py with a `metric`): its value is the target, met when the
    run's number (whole split) is at or below it; a run with fewer steps than the source's is 'partial'."""
    note: str = ""
    """What a reader should know beside the number (markdown), e.g. a link to the source's recipe rerun here."""

    @field_validator("published")
    @classmethod
    def _known(cls, key: str) -> str:
        return _published_key(key, ("nats",), need_metric=True)

    @property
    def reference(self) -> Published:
        return PUBLISHED[self.published]


class PerTokenReference(Strict):
    """A perplexity published per token of a tokenizer we do not have (LLMfromScratch's Oz model): the report sets
    it beside every run of the corpus in bits per character, the only number that compares across tokenizers."""

    corpus: str
    """The corpus the number is about (a key of `corpora`)."""
    published: str
    """The published per-token perplexity (a key of lm/references.py in perplexity)."""

    @field_validator("published")
    @classmethod
    def _known(cls, key: str) -> str:
        return _published_key(key, ("perplexity",))

    @property
    def reference(self) -> Published:
        return PUBLISHED[self.published]


class ReportConfig(Strict):
    """Settings of the report stage."""

    title: str = "From a bigram table to a GPT"
    """Title of reports/README.md."""
    samples_per_run: int = Field(default=5, ge=0)
    """Samples shown per run in the report."""
    ablation: list[str] = []
    """Runs of one corpus in ladder order, each changing one thing from the row before: the report's table
    "What each change buys" (params, val loss, bpc, and the change in each against the previous row)."""
    anchors: list[Anchor] = []
    """Published numbers with the run that reproduces each: the report's table "Source anchors" (ours, the target,
    the difference, met or not, partial when the run trained fewer steps than the source)."""
    per_token: list[PerTokenReference] = []
    """Per-token perplexities of unknown tokenizers, compared in bits per character."""
    embedding_families: FamilyNames = ["mlp", "wavenet"]
    """Families whose char-level token embeddings the report compares (cosine similarity, the
    Language modeling journey's figs. 3 and 5)."""


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


class BaselineConfig(Strict):
    """A classical classifier of a labelled corpus (lm/classification.py): TF-IDF over n-grams and a logistic
    regression, its C picked on the val split. What a practitioner tries first, beside the fine-tuned runs."""

    corpus: str
    """The labelled corpus (a key of `corpora` with format 'labelled')."""
    analyzer: Literal["char_wb", "char", "word"] = "char_wb"
    """scikit-learn TfidfVectorizer's analyzer: character n-grams inside word boundaries, across them, or words."""
    ngram_min: int = Field(default=1, ge=1, le=10)
    """Shortest n-gram."""
    ngram_max: int = Field(default=5, ge=1, le=10)
    """Longest n-gram."""
    C: list[float] = Field(default=[1.0, 10.0, 100.0], min_length=1)
    """Inverse regularisation strengths to try; the best on val accuracy is kept (ties: the smallest)."""

    @model_validator(mode="after")
    def _ranges(self) -> BaselineConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        if any(c <= 0 for c in self.C):
            raise ValueError(f"C values must be > 0, got {self.C}")
        return self


class FinetuneConfig(Strict):
    """A classifier of a labelled corpus made from a run of the ladder (lm/finetune.py): the run's transformer with a
    linear head on the hidden state of each message's last token in place of its LM head, trained with AdamW."""

    run: str
    """The pretrained run (a key of `runs`; a transformer family: gpt, llama, block). Its tokenizer encodes the
    messages."""
    corpus: str
    """The labelled corpus (a key of `corpora` with format 'labelled')."""
    trainable: Literal["head", "last_block", "all"] = "last_block"
    """What is trained: the new head only; the last transformer block, the final norm and the head (Raschka's book);
    or every parameter."""
    init: Literal["pretrained", "random"] = "pretrained"
    """Start from the run's trained weights, or from the same architecture's random init (train.seed): what
    pretraining buys is the difference."""
    max_length: int | None = Field(default=None, ge=1)
    """Tokens per message: longer ones are cut (truncation_side), shorter ones padded after their last token (which
    never attends to the padding). Default and upper bound: the run's block_size."""
    truncation_side: Literal["left", "right"] = "left"
    """Which end of a longer message is cut (Hugging Face's term): 'left' keeps its last max_length tokens, 'right'
    its first (Raschka's book). The state read is the last kept token's, which sees every kept token; the end of a
    message is the better half here (docs/finetune.md measures both)."""
    spread_seeds: list[int] = []
    """More values of train.seed to fine-tune with (head init, batch order; the split stays the study's): their test
    accuracies give the row's spread. Only train.seed's model is kept."""
    train: TrainConfig = TrainConfig(max_steps=200, lr=1e-3, eval_interval=20, weight_decay=0.1)
    """Optimisation: AdamW (optimizer 'adamw' only), keep 'best' ranks evaluations by val accuracy on the whole
    val split."""

    @model_validator(mode="after")
    def _adamw(self) -> FinetuneConfig:
        if self.train.optimizer != "adamw":
            raise ValueError(f"train.optimizer: fine-tuning uses 'adamw', got {self.train.optimizer!r}")
        if self.train.seed in self.spread_seeds:
            raise ValueError(f"spread_seeds: {self.train.seed} is train.seed already; list the other seeds")
        return self


class ProbeConfig(Strict):
    """A linear probe per layer (lm/probe.py): logistic regression on the frozen hidden state of each message's last
    token after each layer of a run, and of the same architecture at random init, on a labelled corpus."""

    run: str
    """The pretrained run (a key of `runs`; a transformer family)."""
    corpus: str
    """The labelled corpus (a key of `corpora` with format 'labelled')."""
    max_length: int | None = Field(default=None, ge=1)
    """Tokens per message (as FinetuneConfig.max_length)."""
    truncation_side: Literal["left", "right"] = "left"
    """Which end of a longer message is cut (as FinetuneConfig.truncation_side)."""
    C: list[float] = Field(default=[0.01, 0.1, 1.0, 10.0], min_length=1)
    """Inverse regularisation strengths to try per layer; the best on val accuracy is kept (ties: the smallest)."""


GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


class GGUFConfig(Strict):
    """A run exported as GGUF in several types and checked by llama.cpp (lm/gguf_eval.py; one gguf stage per run,
    keyed by the run's name): a gpt or llama run of a 'text' corpus."""

    types: list[Literal["f32", "f16", "q8_0", "q4_0"]] = list(GGUF_TYPES)
    """The types to export and measure (1-D tensors stay f32 in each); 'f32' is required: the checks run on it."""
    greedy_tokens: int = Field(default=100, ge=1)
    """Greedy tokens compared with llama.cpp's (its KV cache, the window refilled past block_size)."""
    prompt_chars: int = Field(default=16, ge=1)
    """The greedy prompt: the val text's first this many characters."""
    speed_repeats: int = Field(default=7, ge=1)
    """Generation speed is the median of this many runs on each side."""

    @model_validator(mode="after")
    def _types(self) -> GGUFConfig:
        if "f32" not in self.types or len(set(self.types)) != len(self.types):
            raise ValueError(f"types {self.types}: list each type once, 'f32' among them (the checks run on it)")
        return self


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
    baselines: dict[str, BaselineConfig] = {}
    """Classical classifiers of labelled corpora by name: one baseline stage each."""
    finetune: dict[str, FinetuneConfig] = {}
    """Classifiers fine-tuned from runs of the ladder, by name: one finetune stage each."""
    probes: dict[str, ProbeConfig] = {}
    """Per-layer linear probes of runs, by name: one probe stage each."""
    gguf: dict[str, GGUFConfig] = {}
    """Runs exported as GGUF and checked by llama.cpp, by run name: one gguf stage each."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluate-stage settings."""
    report: ReportConfig = ReportConfig()
    """Report-stage settings."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking settings (every stage)."""

    @field_validator("corpora", "tokenizers", "runs", "baselines", "finetune", "probes", "gguf")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not NAME_RE.match(k)]
        if bad:
            raise ValueError(
                f"names {[k if len(k) <= 40 else k[:37] + '...' for k in bad]} must match {NAME_RE.pattern} "
                f"(lowercase letters, digits, '-', '_'; at most {NAME_MAX} characters)"
            )
        return v

    @model_validator(mode="after")
    def _references(self) -> StudyConfig:
        problems = []
        for name, tok in self.tokenizers.items():
            if tok.corpus not in self.corpora:
                problems.append(f"tokenizers.{name}.corpus: got {tok.corpus!r}; must be one of {sorted(self.corpora)}")
            elif self.corpora[tok.corpus].format == "labelled":
                problems.append(
                    f"tokenizers.{name}.corpus: {tok.corpus!r} is a labelled corpus (for fine-tuning); a tokenizer "
                    "is trained on a 'lines' or 'text' corpus"
                )
        for name, base in self.baselines.items():
            if (corpus := self.corpora.get(base.corpus)) is None or corpus.format != "labelled":
                labelled = sorted(k for k, c in self.corpora.items() if c.format == "labelled")
                problems.append(f"baselines.{name}.corpus: got {base.corpus!r}; must be a labelled corpus: {labelled}")
        for section, entries in (("finetune", self.finetune), ("probes", self.probes)):
            for name, ft in entries.items():
                problems += self._classifier_problems(f"{section}.{name}", ft)
        for name in self.gguf:
            problems += self._gguf_problems(name)
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

    def _classifier_problems(self, where: str, cfg: FinetuneConfig | ProbeConfig) -> list[str]:
        """A finetune or probe entry's references: a run of `runs`, a labelled corpus, max_length <= block_size."""
        problems = []
        if (corpus := self.corpora.get(cfg.corpus)) is None or corpus.format != "labelled":
            labelled = sorted(k for k, c in self.corpora.items() if c.format == "labelled")
            problems.append(f"{where}.corpus: got {cfg.corpus!r}; must be a labelled corpus: {labelled}")
        if (run := self.runs.get(cfg.run)) is None:
            problems.append(f"{where}.run: got {cfg.run!r}; must be a run of `runs`")
        elif cfg.max_length is not None and cfg.max_length > run.model.block_size:
            problems.append(
                f"{where}.max_length: got {cfg.max_length}; run {cfg.run!r} reads at most block_size "
                f"{run.model.block_size} tokens"
            )
        return problems

    def _gguf_problems(self, name: str) -> list[str]:
        """A gguf entry names a gpt or llama run of a 'text' corpus (llama.cpp's tools read one text)."""
        if (run := self.runs.get(name)) is None:
            return [f"gguf.{name}: not a run of `runs`; gguf entries are keyed by the run to export"]
        if run.model.family not in ("gpt", "llama"):
            return [f"gguf.{name}: family {run.model.family!r}; llama.cpp runs 'gpt' and 'llama' runs only"]
        tok = self.tokenizers.get(run.tokenizer)
        if tok is not None and tok.corpus in self.corpora and self.corpora[tok.corpus].format != "text":
            return [f"gguf.{name}: corpus {tok.corpus!r} is not a 'text' corpus; llama.cpp's checks read one val text"]
        if self.gguf[name].prompt_chars >= run.model.block_size:
            return [f"gguf.{name}.prompt_chars: must be below the run's block_size {run.model.block_size}"]
        return []

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
        where = "lm/families.py" if ".model." in f".{path}." else "lm/config.py"  # a family's keys, or the study's
        return f"{path}: unknown key {loc[-1]!r}; check the spelling against the documented keys ({where})"
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
