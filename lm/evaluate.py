"""The only evaluation path: loss, perplexity and bits per character on a whole split, and sampling.

Metric definitions (STUDY.md), used everywhere:
  loss = mean negative log-likelihood in nats per token over every target of the split, fixed order;
  ppl  = exp(loss), per token (not comparable across tokenizers);
  bpc  = total nats / (ln 2 × characters the scored tokens decode to): comparable across tokenizers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lm.batches import Batches
from lm.config import EvaluateConfig


@torch.no_grad()
def score(model: torch.nn.Module, batches: Batches, batch_size: int, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Total nats and number of targets over the whole split, in eval mode, in a fixed order."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches.iterate(batch_size):
        logits, _ = model(x.to(device))
        # Sum in float64 so the total does not depend on how the split is batched.
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="none")
        total += float(nll.double().sum())
        count += int((y != -1).sum())
    return total, count


def metrics(total_nats: float, tokens: int, characters: int) -> dict[str, float]:
    """The metrics dict for one split (see module docstring)."""
    loss = total_nats / tokens
    return {"loss": loss, "ppl": math.exp(loss), "bpc": total_nats / (math.log(2) * characters), "tokens": tokens, "characters": characters}


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Append up to `max_new_tokens` sampled tokens to `idx` (B, T), cropping the context to the
    model's block_size (every family's predictions only depend on that many tokens).
    With `stop_id`, stops once every row has produced it."""
    model.eval()
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.block_size :])
        logits = logits[:, -1, :].float() / temperature  # (B, V)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
        if stop_id is not None:
            done |= nxt.squeeze(1) == stop_id
            if bool(done.all()):
                break
    return idx


def samples(model, tokenizer, fmt: str, boundary_id: int | None, cfg: EvaluateConfig, device="cpu") -> list[str]:
    """Seeded samples: `num_names` names for 'lines' corpora, `num_passages` passages of
    `passage_chars` characters for 'text' corpora."""
    g = torch.Generator().manual_seed(cfg.seed)
    kw = {"temperature": cfg.temperature, "top_k": cfg.top_k, "generator": g}
    if fmt == "lines":
        out = []
        for _ in range(cfg.num_names):
            start = torch.tensor([[boundary_id]], device=device)
            ids = generate(model, start, 64, stop_id=boundary_id, **kw)[0, 1:].tolist()
            name = tokenizer.decode(ids[: ids.index(boundary_id)] if boundary_id in ids else ids)
            out.append(name)
        return out
    try:  # passages start after a newline, as a fresh paragraph; a vocabulary without one starts at id 0
        start_ids = tokenizer.encode("\n").ids or [0]
    except Exception:
        start_ids = [0]
    passages = []
    for _ in range(cfg.num_passages):
        idx = torch.tensor([start_ids], device=device)
        text = ""
        while len(text) < cfg.passage_chars:  # tokens are 1 to many characters: grow until long enough
            idx = generate(model, idx, 256, **kw)
            text = tokenizer.decode(idx[0, len(start_ids) :].tolist())
        passages.append(text[: cfg.passage_chars])
    return passages


def parameter_distribution(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts by component (token/position embedding, attention, feed-forward, norm, head, other).
    Tied tensors are counted once, under the first name that holds them."""
    from lm.models import component_of

    counts: dict[str, int] = {}
    seen = set()
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        comp = component_of(name)
        counts[comp] = counts.get(comp, 0) + p.numel()
    return counts
