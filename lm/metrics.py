"""The metrics and the one scorer: loss, perplexity and bits per character of a model on batches of a split.

Metric definitions (docs/models.md), used everywhere:
  loss = mean negative log-likelihood in nats per token over every target of the split, fixed order;
  ppl  = exp(loss), per token (not comparable across tokenizers);
  bpc  = total nats / (ln 2 × characters the scored tokens decode to): comparable across tokenizers.

The evaluate stage (lm/evaluate.py) scores whole splits (``Batches.iterate``); the training loop scores its
fixed val subset with the same :func:`score`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lm.models import IGNORE_INDEX


def autocast(device: torch.device | str, dtype: str):
    """The forward pass's autocast context for ``dtype`` ('float32': none; 'bfloat16': bf16 autocast)."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if dtype != "float32":  # 'auto' is resolved for the machine first (lm.precision.resolve)
        raise ValueError(f"autocast dtype {dtype!r}: expected 'float32' or 'bfloat16'")
    return nullcontext()


def _outputs(model: torch.nn.Module, batches: Iterable, device, dtype: str):
    """(logits, targets on `device`) of each batch in order, the model in eval mode meanwhile (its mode restored)."""
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            with autocast(device, dtype):
                logits, _ = model(x.to(device))
            yield logits, y.to(device)
    finally:
        model.train(was_training)


@torch.no_grad()
def score(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    dtype: str = "float32",
) -> tuple[float, int]:
    """Total nats and number of scored targets over ``batches`` (in their order), in eval mode.

    The model's train/eval mode is restored afterwards. Sums run in float64 so the total does not depend on
    how a split is batched.
    """
    total, count = 0.0, 0
    for logits, y in _outputs(model, batches, device, dtype):
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        total += float(nll.double().sum())
        count += int((y != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    dtype: str = "float32",
) -> tuple[int, int]:
    """Targets whose argmax prediction is the target, and targets scored, over ``batches``, in eval mode (restored
    afterwards): a classifier's accuracy (lm/finetune.py), or a language model's next-token accuracy."""
    correct, count = 0, 0
    for logits, y in _outputs(model, batches, device, dtype):
        correct += int(((logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum())
        count += int((y != IGNORE_INDEX).sum())
    return correct, count


def metrics(total_nats: float, tokens: int, characters: int) -> dict[str, float]:
    """The metrics dict of one split (see the module docstring)."""
    loss = total_nats / tokens
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "bpc": total_nats / (math.log(2) * characters),
        "tokens": tokens,
        "characters": characters,
    }
