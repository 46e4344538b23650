"""Looking inside trained models, as the sources teach: attention patterns and head roles (Language model from
scratch; Olsson et al. 2022), the arrays the report draws (attention on a fixed passage, the next-token table,
token embeddings) and the quality of generated text beyond perplexity (LLMfromScratch's BLEU; distinct-n, Li et al.
2016; memorisation). Training health, recorded while training, is lm/health.py.

Nothing here changes a model: attention maps are read by wrapping ``F.scaled_dot_product_attention``, through which
every attention family computes attention (lm/models/attention.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# attention maps and head roles


@contextmanager
def capture_attention() -> Iterator[list[torch.Tensor]]:
    """Record the attention probabilities of every ``F.scaled_dot_product_attention`` call made inside the block.

    Yields a list that fills with one (B, nh, T, S) float32 tensor per call, in call order (for the attention
    families: one call per layer, first layer first). The wrapper computes softmax(q·kᵀ/√d + mask) explicitly and
    returns its product with v, so the forward pass goes on as before (up to float rounding); dropout is not
    applied: call it on a model in eval mode.
    """
    real = F.scaled_dot_product_attention
    maps: list[torch.Tensor] = []

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and k.size(-3) != q.size(-3):
            g = q.size(-3) // k.size(-3)
            k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
        att = (q.float() @ k.float().transpose(-2, -1)) * (scale or 1 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
        T, S = att.shape[-2:]
        if is_causal:  # SDPA's triangle is aligned top-left
            att = att.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=att.device).tril(), float("-inf"))
        elif attn_mask is not None:
            att = att.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else att + attn_mask
        att = att.softmax(dim=-1)
        maps.append(att.detach().cpu())
        return (att @ v.float()).to(q.dtype)  # (B, nh, T, hs)

    F.scaled_dot_product_attention = recording
    try:
        yield maps
    finally:
        F.scaled_dot_product_attention = real


@torch.no_grad()
def attention_maps(model: nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities of every layer for the token ids `idx` (B, T): a list of (B, nh, T, T), empty
    for a family without attention."""
    was_training = model.training
    model.eval()
    try:
        with capture_attention() as maps:
            model(idx)
    finally:
        model.train(was_training)
    return maps


def previous_token_scores(maps: Sequence[torch.Tensor]) -> list[list[float]]:
    """Per layer and head, the mean attention from position t to t-1 over t >= 1 (1.0: a pure previous-token head)."""
    out = []
    for att in maps:  # (B, nh, T, T)
        T = att.size(-1)
        t = torch.arange(1, T)
        out.append(att[..., t, t - 1].mean(dim=(0, 2)).tolist())  # (B, nh, T-1) -> (nh,)
    return out


def induction_scores(maps: Sequence[torch.Tensor], half: int) -> list[list[float]]:
    """Per layer and head, on sequences made of a random half repeated once (length 2·half): the mean attention
    from each position t of the second copy to t - half + 1, the token after the current token's first occurrence
    (the prefix-matching score of Olsson et al. 2022; 1.0: a pure induction head)."""
    out = []
    for att in maps:  # (B, nh, 2·half, 2·half)
        t = torch.arange(half, 2 * half)
        out.append(att[..., t, t - half + 1].mean(dim=(0, 2)).tolist())  # (B, nh, half) -> (nh,)
    return out


def repeated_random_tokens(vocab_size: int, half: int, batch: int = 16, seed: int = 0) -> torch.Tensor:
    """(batch, 2·half) ids: each row a random sequence of `half` distinct tokens (where the vocabulary allows)
    followed by itself, the probe of induction heads."""
    g = torch.Generator().manual_seed(seed)
    if vocab_size >= half:
        first = torch.stack([torch.randperm(vocab_size, generator=g)[:half] for _ in range(batch)])
    else:
        first = torch.randint(0, vocab_size, (batch, half), generator=g)
    return torch.cat([first, first], dim=1)


def head_scores(
    model: nn.Module, val_ids: np.ndarray, vocab_size: int, block_size: int, *, windows: int = 16, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per head ('L0.H0', ...): its previous-token score on `windows` evenly spaced val windows of block_size
    tokens, and its induction score on repeated random tokens (halves of block_size // 2). Empty without attention.
    """
    device = next(model.parameters()).device
    T = min(block_size, len(val_ids) - 1)
    starts = np.linspace(0, len(val_ids) - T - 1, num=windows).astype(np.int64)
    text = torch.from_numpy(np.stack([np.asarray(val_ids[s : s + T], dtype=np.int64) for s in starts]))
    prev = previous_token_scores(attention_maps(model, text.to(device)))
    half = block_size // 2
    ind = induction_scores(attention_maps(model, repeated_random_tokens(vocab_size, half, seed=seed).to(device)), half)
    return {
        f"L{layer}.H{head}": {"prev_token": prev[layer][head], "induction": ind[layer][head]}
        for layer in range(len(prev))
        for head in range(len(prev[layer]))
    }


def clearest_heads(scores: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    """The head with the highest score of each kind: {'prev_token': ('L0.H2', 0.93), 'induction': (...)}."""
    return {
        kind: max(((h, s[kind]) for h, s in scores.items()), key=lambda hs: hs[1])
        for kind in ("prev_token", "induction")
    }


# ----------------------------------------------------------------------------------------------
# the arrays the report draws (the evaluate stage writes them; the report stage only reads them)

PASSAGE_TOKENS = 32
"""The attention grids' passage is at most this many tokens: a label per token stays legible."""


def token_labels(tokenizer, vocab_size: int) -> list[str]:
    """Each token id's text as a figure label: escaped (a newline reads '\\n'), '·' for an empty one."""
    return [repr(tokenizer.decode([i]))[1:-1] or "·" for i in range(vocab_size)]


def attention_passage(tokenizer, val_ids: np.ndarray, offset: int, length: int) -> np.ndarray:
    """`length` token ids of the val split from the first line start at or after character `offset` (the same
    passage for every run of a corpus, whatever its tokenizer)."""
    ids = np.asarray(val_ids, dtype=np.int64)
    text = tokenizer.decode(ids.tolist())
    offset = min(offset, max(0, len(text) - 1))
    nl = text.find("\n", offset)
    start_char = nl + 1 if 0 <= nl < len(text) - 1 else offset
    # The token where that character falls: the token count of the text before it.
    start = len(tokenizer.encode(text[:start_char]).ids) if start_char else 0
    start = min(start, max(0, len(ids) - length))
    return ids[start : start + length]


@torch.no_grad()
def next_token_probs(model: nn.Module) -> torch.Tensor:
    """P(next | current) for every current token of a model that reads one token of context: (V, V)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, _ = model(torch.arange(model.vocab_size, device=device)[:, None])  # (V, 1) ids -> (V, 1, V)
    model.train(was_training)
    return torch.softmax(logits[:, 0].float(), dim=-1).cpu()


def token_embedding(model: nn.Module) -> torch.Tensor | None:
    """The model's token-embedding matrix (the parameter its family maps to 'token_embedding'), or None."""
    for name, p in model.named_parameters():
        if model.component_of(name) == "token_embedding":
            return p.detach().float().cpu()
    return None


def figure_arrays(
    model: nn.Module, model_cfg, tokenizer, kind: str, val_ids: np.ndarray, attention_offset: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the report draws of one run, as safetensors tensors and string metadata:

    - ``attention`` (n_layer, n_head, T, T) on the fixed passage ``passage`` (T ids), with its token labels
      (``passage_labels``), for a family with attention;
    - ``next_token_probs`` (V, V) for a family that reads one token of context (the bigrams);
    - ``token_embedding`` (V, n_embd) and the vocabulary's labels (``vocab_labels``) for a char tokenizer.

    The labels travel as one JSON metadata entry, ``lm.labels``."""
    tensors: dict[str, torch.Tensor] = {}
    labels = token_labels(tokenizer, model.vocab_size)
    meta: dict[str, list[str]] = {}
    if model_cfg.context == "window":
        ids = attention_passage(tokenizer, val_ids, attention_offset, min(model_cfg.block_size, PASSAGE_TOKENS))
        device = next(model.parameters()).device
        if maps := attention_maps(model, torch.from_numpy(ids)[None].to(device)):
            tensors["attention"] = torch.stack([m[0] for m in maps]).float().contiguous()  # (n_layer, nh, T, T)
            tensors["passage"] = torch.from_numpy(ids)
            meta["passage_labels"] = [labels[i] for i in ids]
    if model_cfg.context == "fixed" and model_cfg.block_size == 1:
        tensors["next_token_probs"] = next_token_probs(model).contiguous()
    if kind == "char" and (emb := token_embedding(model)) is not None:
        tensors["token_embedding"] = emb.contiguous()
        meta["vocab_labels"] = labels
    # One metadata entry (safetensors orders several at random: the bytes would differ run to run), never empty
    # (an empty header does not read back).
    return tensors, {"lm.labels": json.dumps(meta, sort_keys=True, ensure_ascii=False)}


# ----------------------------------------------------------------------------------------------
# generation quality


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of `texts` (Li et al. 2016), 0 when there are none."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def copy_rate(texts: Sequence[str], train_text: str, n: int = 8) -> float:
    """The share of the character n-grams of `texts` that occur verbatim in `train_text` (memorisation)."""
    grams = [t[i : i + n] for t in texts for i in range(len(t) - n + 1)]
    found = {g: g in train_text for g in set(grams)}  # each distinct n-gram searched once (greedy text repeats)
    return sum(found[g] for g in grams) / len(grams) if grams else 0.0


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF of `hypotheses` against one reference each, by sacrebleu (0-100 scales)."""
    import sacrebleu

    refs = [list(references)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(list(hypotheses), refs).score),
        "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), refs).score),
    }


def prompts(val_text: str, count: int, prompt_chars: int, continuation_chars: int) -> list[tuple[str, str]]:
    """`count` (prompt, true continuation) pairs cut from evenly spaced places of the val text, each prompt starting
    at a line start where one is within a prompt's length (a fixed choice: the same for every run of a corpus)."""
    span = prompt_chars + continuation_chars
    if len(val_text) < span:
        raise ValueError(f"the val text has {len(val_text)} characters, fewer than a prompt and continuation ({span})")
    out = []
    for start in np.linspace(0, len(val_text) - span, num=count).astype(int):
        if start == 0 or val_text[start - 1] == "\n":
            s = start
        elif 0 <= (nl := val_text.find("\n", start, start + prompt_chars)) <= len(val_text) - span - 1:
            s = nl + 1
        elif (nl := val_text.rfind("\n", max(0, start - prompt_chars), start)) >= 0:
            s = nl + 1  # near the end: the line start before
        else:
            s = start
        out.append((val_text[s : s + prompt_chars], val_text[s + prompt_chars : s + span]))
    return out


@torch.no_grad()
def continuations(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, greedy: bool, cfg, device="cpu"
) -> list[str]:
    """The model's continuation of each prompt, as many characters as its true continuation: greedy (top-1) or
    sampled with the evaluate settings `cfg` (temperature, top_k, seed). The prompts are encoded, cut on the left to
    the shortest one's token count (so they run as one batch) and continued together."""
    from lm.generate import long_enough, stream

    ids = [tokenizer.encode(p).ids for p, _ in pairs]
    n = min(len(i) for i in ids)
    idx = torch.tensor([i[len(i) - n :] for i in ids], device=device)  # (B, n)
    length = max(len(c) for _, c in pairs)  # tokens: at least one character each (a byte-level token may be less)
    kw = {"top_k": 1} if greedy else {"temperature": cfg.temperature, "top_k": cfg.top_k}
    rows: list[list[int]] = [[] for _ in pairs]
    for nxt in stream(model, idx, length, generator=torch.Generator().manual_seed(cfg.seed), **kw):
        for row, t in zip(rows, nxt[:, 0].tolist()):
            row.append(t)
        # A BPE token is several characters: stop once every text is long enough (later tokens cannot change it).
        if all(long_enough(tokenizer, row, len(c)) for row, (_, c) in zip(rows, pairs)):
            break
    return [tokenizer.decode(row)[: len(c)] for row, (_, c) in zip(rows, pairs)]


def generation_quality(
    model: nn.Module, tokenizer, val_text: str, train_text: str, cfg, device="cpu"
) -> dict[str, dict[str, float]]:
    """Continuations of `cfg.quality_prompts` fixed val prompts, greedy and sampled, scored against the true
    continuations (BLEU, chrF), with distinct-1/2 and the 8-gram copy rate from the training text."""
    pairs = prompts(val_text, cfg.quality_prompts, cfg.prompt_chars, cfg.continuation_chars)
    refs = [c for _, c in pairs]
    out = {}
    for mode in ("greedy", "sampled"):
        hyps = continuations(model, tokenizer, pairs, greedy=mode == "greedy", cfg=cfg, device=device)
        out[mode] = bleu_chrf(hyps, refs) | {
            "distinct_1": distinct_n(hyps, 1),
            "distinct_2": distinct_n(hyps, 2),
            "copy_rate_8": copy_rate(hyps, train_text, 8),
        }
    out["reference"] = {"distinct_1": distinct_n(refs, 1), "distinct_2": distinct_n(refs, 2),
                        "copy_rate_8": copy_rate(refs, train_text, 8)}  # fmt: skip
    return out
