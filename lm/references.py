"""Every published number the study compares with, in one place: its value, what it measures, and where it is
published (the document and section, and a URL where it is public). docs/sources.md describes the documents.

The report, the presets' anchors (``report.anchors``, ``report.per_token``), ``lm params``' reference
configurations, the benchmarks that rerun a source's own recipe, and the tests read these entries; no other
module of lm/, stages/ or bench/ writes a published number as a literal (``tests/test_references.py`` fails if
one does). Torch-free, so params validation can check the keys a params file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Unit = Literal["nats", "perplexity", "BLEU", "parameters", "MB", "share", "accuracy"]


@dataclass(frozen=True)
class Published:
    """One published number."""

    value: float
    """The number as its source writes it (a count as an int)."""
    unit: Unit
    """nats: a mean negative log-likelihood per token (natural log); perplexity: per token of the source's own
    tokenizer; share / accuracy: a fraction in [0, 1]."""
    measures: str
    """What the number is of: the model, its configuration, the split and the protocol."""
    source: str
    """Where it is published: the document by its title (docs/sources.md), and the section."""
    url: str = ""
    """A public address of the source, where there is one."""
    metric: Literal["val/loss", "test/loss", "all/loss"] | None = None
    """For a loss a run of the study compares with: the key of the run's metrics JSON ('all/loss': fitted and
    scored on every split, lm/evaluate.py)."""
    steps: int | None = None
    """For such a loss: the source's training length in steps (a run that trains fewer is 'partial')."""
    tolerance: float | None = None
    """None: a bar to meet (ours at or below it is 'met'). A number: a value to reproduce, 'reproduced' when ours
    is within this of it (the reason is in `measures`)."""

    @property
    def cited(self) -> str:
        """The source as a table cell: its text, followed by the URL when there is one."""
        return f"{self.source} ({self.url})" if self.url else self.source


ZERO_TO_HERO = "https://github.com/karpathy/nn-zero-to-hero/blob/master/lectures/makemore"
"""The makemore lectures' notebooks (Neural Networks: Zero to Hero), which the Language modeling journey follows."""
RASCHKA = "https://github.com/rasbt/LLMs-from-scratch"
"""The code of Raschka's Build a Large Language Model (From Scratch), which the Raschka learning journey follows."""

PUBLISHED: dict[str, Published] = {
    # -- names: the makemore lectures and their peers ------------------------------------------------------------
    "makemore-bigram-nll": Published(
        2.4544,
        "nats",
        "the count bigram with +1 smoothing, fitted on all of names.txt and scored on all of its 228,146 bigrams. "
        "The lecture sums float32 log-probabilities one at a time, which gives 2.45436; the study sums in float64, "
        "2.45458 (tests/test_references.py shows both): reproduced within 0.0005",
        "makemore lecture 1, 'The spelled-out intro to language modeling: building makemore'",
        f"{ZERO_TO_HERO}/makemore_part1_bigrams.ipynb",
        metric="all/loss",
        tolerance=0.0005,
    ),
    "makemore-mlp-val": Published(
        2.17,
        "nats",
        "val loss of the MLP of Bengio et al. 2003 on names: context 3, embedding 10, hidden 200, 200,000 SGD steps "
        "of 32 examples",
        "makemore lecture 2, 'Building makemore Part 2: MLP'",
        f"{ZERO_TO_HERO}/makemore_part2_mlp.ipynb",
        metric="val/loss",
        steps=200_000,
    ),
    "makemore-bn-val": Published(
        2.10,
        "nats",
        "val loss of the MLP with BatchNorm on names (context 3, embedding 10, hidden 200, 12,097 parameters), "
        "200,000 SGD steps of 32 examples, one seed",
        "makemore lecture 3, 'Building makemore Part 3: Activations & Gradients, BatchNorm'",
        f"{ZERO_TO_HERO}/makemore_part3_bn.ipynb",
        metric="val/loss",
        steps=200_000,
    ),
    "makemore-bn-notebook-train": Published(
        2.0668,
        "nats",
        "train loss the lecture's notebook prints for that BatchNorm MLP after its 200,000 steps",
        "makemore lecture 3 notebook",
        f"{ZERO_TO_HERO}/makemore_part3_bn.ipynb",
    ),
    "makemore-bn-notebook-val": Published(
        2.1048,
        "nats",
        "val loss the lecture's notebook prints for that BatchNorm MLP after its 200,000 steps (the lecture rounds "
        "it to 2.10)",
        "makemore lecture 3 notebook",
        f"{ZERO_TO_HERO}/makemore_part3_bn.ipynb",
    ),
    "makemore-wavenet-val": Published(
        1.9937,
        "nats",
        "val loss of the WaveNet on names: context 8, embedding 24, hidden 128, 76,579 parameters, 200,000 SGD steps",
        "makemore lecture 5, 'Building makemore Part 5: Building a WaveNet'",
        f"{ZERO_TO_HERO}/makemore_part5_cnn1.ipynb",
        metric="val/loss",
        steps=200_000,
    ),
    "makemore-transformer-test": Published(
        1.92,
        "nats",
        "test loss ('~1.92') of makemore.py's default transformer on names (its own 1,000 test names)",
        "makemore README",
        "https://github.com/karpathy/makemore",
        metric="test/loss",
    ),
    "eureka-ngram-test": Published(
        2.106,
        "nats",
        "test loss of a 4-gram with add-k smoothing on names (its own split and smoothing constant)",
        "EurekaLabsAI/ngram README",
        "https://github.com/EurekaLabsAI/ngram",
        metric="test/loss",
    ),
    # -- Shakespeare: nanoGPT ----------------------------------------------------------------------------------------
    "nanogpt-shakespeare-char-val": Published(
        1.4697,
        "nats",
        "best val loss of nanoGPT's train_shakespeare_char (6 layers, 6 heads, 384 wide, context 256, dropout 0.2, "
        "5,000 iterations) on a GPU",
        "nanoGPT README, 'quick start'",
        "https://github.com/karpathy/nanoGPT",
        metric="val/loss",
        steps=5_000,
    ),
    "nanogpt-cpu-val": Published(
        1.88,
        "nats",
        "val loss ('~1.88') of nanoGPT's CPU configuration (4 layers, 4 heads, 128 wide, context 64, batch 12, "
        "2,000 iterations, no dropout)",
        "nanoGPT README, 'quick start' (CPU)",
        "https://github.com/karpathy/nanoGPT",
        metric="val/loss",
        steps=2_000,
    ),
    # -- Oz: LLMfromScratch -------------------------------------------------------------------------------------------
    "llmfromscratch-oz-ppl": Published(
        42.7,
        "perplexity",
        "val perplexity of its transformer on The Wonderful Wizard of Oz, per token of its own BPE tokenizer "
        "(characters per token not published; its cross-entropy: 3.2)",
        "LLMfromScratch, 'Evaluation'",
    ),
    "llmfromscratch-oz-bleu": Published(
        0.25,
        "BLEU",
        "BLEU of its Oz model's generations against reference outputs (its own split, tokenizer and protocol)",
        "LLMfromScratch, 'Evaluation'",
    ),
    "llmfromscratch-ngram-ppl": Published(
        300,
        "perplexity",
        "perplexity of 'traditional statistical n-gram models trained on the same corpus' (order and tokenizer "
        "not published)",
        "LLMfromScratch, 'Comparison with baseline models'",
    ),
    # -- parameter counts ---------------------------------------------------------------------------------------------
    "makemore-bigram-params": Published(
        729, "parameters", "the names bigram table, 27 x 27", "Language modeling journey, 'Bigram model'"
    ),
    "makemore-mlp-params": Published(
        8_762,
        "parameters",
        "the names MLP: context 3, embedding 5, hidden 200",
        "Language modeling journey, 'Multi-layer perceptron'",
    ),
    "makemore-mlp-bn-params": Published(
        12_097,
        "parameters",
        "the names MLP with BatchNorm: context 3, embedding 10, hidden 200, no bias before BatchNorm",
        "makemore lecture 3",
        f"{ZERO_TO_HERO}/makemore_part3_bn.ipynb",
    ),
    "journey-wavenet-params": Published(
        175_767,
        "parameters",
        "the WaveNet on names ('176k'): context 8, embedding 20, hidden 200, biased Linears",
        "Language modeling journey, 'WaveNet'",
    ),
    "makemore-wavenet-params": Published(
        76_579,
        "parameters",
        "the WaveNet on names: context 8, embedding 24, hidden 128, bias-free Linears",
        "makemore lecture 5",
        f"{ZERO_TO_HERO}/makemore_part5_cnn1.ipynb",
    ),
    "lets-build-gpt-params": Published(
        10_788_929,
        "parameters",
        "the Shakespeare char GPT ('10.7M'): 6 layers, 6 heads, 384 wide, context 256, an LM head with a bias, untied",
        "Language modeling journey, 'GPT from scratch' (Let's build GPT)",
    ),
    "gpt2-small-params": Published(
        163_009_536,
        "parameters",
        "GPT-2 small with Raschka's config (vocab 50,257, context 1,024, 768 wide, 12 layers, 12 heads, no qkv bias), "
        "head untied",
        "the Raschka learning journey, 'GPT-2 parameters'",
        RASCHKA,
    ),
    "gpt2-small-params-tied": Published(
        124_412_160,
        "parameters",
        "the same GPT-2 small with the head tied to the token embedding",
        "the Raschka learning journey, 'GPT-2 parameters'",
        RASCHKA,
    ),
    "gpt2-small-token-embedding-share": Published(
        0.31,
        "share",
        "the token embedding's share of the tied GPT-2 small (38,597,376 parameters)",
        "the Raschka learning journey, 'GPT-2 parameters'",
    ),
    "gpt2-small-feed-forward-share": Published(
        0.45,
        "share",
        "the feed-forward modules' share of the tied GPT-2 small (4,722,432 per block)",
        "the Raschka learning journey, 'GPT-2 parameters'",
    ),
    "gpt2-small-attention-share": Published(
        0.23,
        "share",
        "the attention modules' share of the tied GPT-2 small (2,360,064 per block)",
        "the Raschka learning journey, 'GPT-2 parameters'",
    ),
    "gpt2-small-fp32-mb": Published(
        621.83,
        "MB",
        "GPT-2 small's untied parameters in float32 (4 bytes each, 1 MB = 2**20 bytes)",
        "the Raschka learning journey, 'GPT-2 parameters'",
    ),
    "gpt2-medium-params": Published(
        406_212_608,
        "parameters",
        "GPT-2 medium (1,024 wide, 24 layers, 16 heads) with the same settings, head untied",
        "Raschka, Build a Large Language Model (From Scratch), chapter 4 exercise solutions",
        RASCHKA,
    ),
    "gpt2-large-params": Published(
        838_220_800,
        "parameters",
        "GPT-2 large (1,280 wide, 36 layers, 20 heads) with the same settings, head untied",
        "Raschka, Build a Large Language Model (From Scratch), chapter 4 exercise solutions",
        RASCHKA,
    ),
    "gpt2-xl-params": Published(
        1_637_792_000,
        "parameters",
        "GPT-2 XL (1,600 wide, 48 layers, 25 heads) with the same settings, head untied",
        "the Raschka learning journey, 'GPT-2 parameters'",
        RASCHKA,
    ),
    "llama-3.2-1b-params": Published(
        1_235_814_400,
        "parameters",
        "Llama 3.2 1B: vocab 128,256, 2,048 wide, 16 layers, 32 heads / 8 KV heads, SwiGLU 8,192, tied",
        "Meta, Llama 3.2 1B model card",
        "https://huggingface.co/meta-llama/Llama-3.2-1B",
    ),
    "llama-2-7b-params": Published(
        6_738_415_616,
        "parameters",
        "Llama 2 7B: vocab 32,000, 4,096 wide, 32 layers, 32 heads, SwiGLU 11,008, untied",
        "Touvron et al. 2023, 'Llama 2'; its Hugging Face checkpoint",
        "https://huggingface.co/meta-llama/Llama-2-7b-hf",
    ),
    # -- fine-tuning (SMS spam) --------------------------------------------------------------------------------------
    "raschka-spam-train-accuracy": Published(
        0.9721,
        "accuracy",
        "GPT-2 124M with its last block, final norm and a 2-class head fine-tuned on the balanced SMS Spam Collection "
        "(747/747, 70/10/20): train accuracy",
        "Raschka, Build a Large Language Model (From Scratch), chapter 6 (the Raschka learning journey follows it)",
        RASCHKA,
    ),
    "raschka-spam-val-accuracy": Published(
        0.9732,
        "accuracy",
        "the same classifier's val accuracy",
        "Raschka, Build a Large Language Model (From Scratch), chapter 6",
        RASCHKA,
    ),
    "raschka-spam-test-accuracy": Published(
        0.9567,
        "accuracy",
        "the same classifier's test accuracy",
        "Raschka, Build a Large Language Model (From Scratch), chapter 6",
        RASCHKA,
    ),
}
"""The published numbers by a stable key (the name params files and code use)."""


def published(key: str) -> Published:
    """The entry of `key`, or a KeyError naming the keys there are."""
    try:
        return PUBLISHED[key]
    except KeyError:
        raise KeyError(f"no published number {key!r}; lm/references.py has: {', '.join(PUBLISHED)}") from None


def value(key: str) -> float:
    """The published value of `key`."""
    return published(key).value
