"""Generation: sampling one token, streaming tokens with the KV cache, and the evaluate stage's seeded samples.

Every family generates through :func:`stream`; the families that declare ``kv_cache`` prefill the window
once and then feed one token per step.

**Context window.** Every family predicts from at most ``model.block_size`` tokens. Token t is
predicted from the window ``seq[start:t]``; when the window outgrows block_size it is cut:

- ``overflow="slide"`` (default): the window is always the last block_size tokens, as
  nanoGPT. Exact, but once the sequence is longer than block_size every step moves every
  token to a new position, so with learned positions nothing cached stays valid and each
  step recomputes the whole window (the cache only helps up to block_size).
- ``overflow="refill"``: the window restarts from the last block_size // 2 tokens and then
  grows again to block_size. With the cache this costs one prefill per block_size // 2
  tokens instead of one per token; predictions see between block_size // 2 and block_size
  tokens of context. Only the attention families (fixed position table) use it; the others
  always slide (their windows are cheap and a cut would left-pad them).

A rolling cache (dropping the oldest key and value) would be wrong with learned or
sinusoidal absolute positions: every cached key was computed at a position that the token
no longer has. So their cache is recomputed, never shifted.

Rotary models (``model.rolls``: llama, and gpt with ``pos: rope``) slide differently: a q·k score
depends only on the distance between the two positions, so the oldest cached key can be dropped
and the rest kept (the cache holds two windows and compacts once per window, :meth:`KVCache.roll`):
one token's work per step past block_size too, as fast as ``refill``. What that computes is
sliding-window attention (Beltagy et al. 2020; Mistral): every layer attends to its last
block_size positions, whose hidden states were computed with their own
windows, so the last prediction can depend on up to n_layer · (block_size - 1) + 1 tokens (for one
layer: exactly the cropped window). The uncached path computes the same thing: one forward pass over
that many tokens with a band mask. So cached and uncached sliding agree for rotary models too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lm.config import EvaluateConfig

PASSAGE_SEPARATOR = "\n\n" + "-" * 72 + "\n\n"
"""Between two passages of text in a samples file (and in ``lm sample`` output); names are one per line."""

OVERFLOW = ("slide", "refill")
"""What generation does once the sequence outgrows the model's block_size (see :func:`stream`)."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the bad sampling setting and its valid range."""
    if not 0 < temperature < math.inf:  # also rejects NaN
        raise ValueError(f"temperature must be a finite number > 0, got {temperature} (top_k=1 is greedy decoding)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (1 is greedy) or None for the whole vocabulary, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token), got {top_p}")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from the last-position ``logits`` (B, V); returns (B, 1) ids.

    Temperature scales the logits; ``top_k`` keeps the k most likely tokens (ties at the k-th
    kept); ``top_p`` keeps the smallest set of most likely tokens whose probability reaches p
    (nucleus sampling, Holtzman et al. 2020). The draw runs on the CPU with ``generator``, so a
    seed gives the same tokens on any device.
    """
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)  # back to vocab order
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)  # (B, 1)


def stream(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool | None = None,
    overflow: str = "slide",
) -> Iterator[torch.Tensor]:
    """Sample up to `max_new_tokens` tokens after the context `idx` (B, T >= 1), yielding each (B, 1) as it is drawn.
    What happens past ``model.block_size`` (`overflow`) is the module docstring's "Context window".

    KV cache. ``use_cache=None`` uses it when the model has one (``model.kv_cache``): the
    window is prefilled once, then each step feeds one token. Under either overflow policy the
    cached and uncached paths compute the same windows, hence the same tokens for a seed (up to
    float rounding in the logits, which does not change an argmax or a draw in practice).
    """
    # Checked here, when stream() is called, rather than at the first next().
    check_sampling(temperature, top_k, top_p)
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ValueError(
            f"idx must be (B, T) with T >= 1 context tokens (e.g. a boundary or newline id), got {tuple(idx.shape)}"
        )
    cached = model.kv_cache if use_cache is None else use_cache
    if cached and not model.kv_cache:
        raise ValueError(
            f"{type(model).__name__} has no KV cache (only the attention families do); pass use_cache=False"
        )
    bs = model.block_size
    keep = max(1, bs // 2) if overflow == "refill" and model.kv_cache else bs  # window length after a cut
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _stream(model, idx, max_new_tokens, keep, cached, sampling)


@torch.no_grad()
def _stream(
    model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, keep: int, cached: bool, sampling: dict
) -> Iterator[torch.Tensor]:
    """The loop of :func:`stream`: ``keep`` is the window length after a cut (block_size for 'slide')."""
    model.eval()
    B, T0 = idx.shape
    bs = model.block_size
    cache = model.new_cache(B) if cached else None
    seq = idx
    start = max(0, T0 - bs)  # first position of the current window
    rolling = keep == bs and getattr(model, "rolls", False)  # 'slide' on a rotary model: sliding-window attention
    floor = start  # rolling: no token before the prompt's window is ever seen, cached or not
    reach = model.receptive_field() if rolling else bs  # uncached rolling: the tokens the last prediction can see
    for _ in range(max_new_tokens):
        if seq.size(1) - start > bs:  # the window is full: cut it
            start = seq.size(1) - keep
            if cache is not None and not rolling:
                cache.reset()  # (a rolling cache keeps its keys; attention reads the last block_size of them)
        if cache is None:
            first = max(floor, seq.size(1) - reach) if rolling else start
            logits, _ = model(seq[:, first:])  # (B, window, V); rolling: every layer's windows, band-masked
        else:
            if rolling and cache.length == cache.max_len:
                cache.roll(cache.length - (bs - 1))  # compact to the last window: once per block_size tokens
            cached_from = floor + cache.offset if rolling else start  # seq index of cache position 0
            logits, _ = model(seq[:, cached_from + cache.length :], cache=cache)  # only what the cache lacks
        nxt = sample_next(logits[:, -1, :], **sampling)  # (B, 1)
        seq = torch.cat([seq, nxt], dim=1)  # (B, T+1)
        yield nxt


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    use_cache: bool | None = None,
    overflow: str = "slide",
) -> torch.Tensor:
    """Append up to `max_new_tokens` sampled tokens to `idx` (B, T) and return it (B, T + n).

    With `stop_id`, stops once every row has produced it. Sampling, the context window and the
    KV cache (used by default for the attention families) are those of :func:`stream`.
    """
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    new = []
    for nxt in stream(
        model,
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        use_cache=use_cache,
        overflow=overflow,
    ):
        new.append(nxt)
        if stop_id is not None:
            done |= nxt.squeeze(1) == stop_id
            if bool(done.all()):
                break
    return torch.cat([idx, *new], dim=1)


class TextStream:
    """Turn a growing list of token ids into printable text increments.

    Byte-level BPE tokens can end in the middle of a UTF-8 character, which decodes to U+FFFD
    until the next token completes it. :meth:`push` decodes the whole sequence and returns only
    the new text, holding back trailing U+FFFD until it resolves; :meth:`flush` returns whatever
    is left at the end (a dangling partial character then prints as U+FFFD).
    """

    def __init__(self, tokenizer, ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(ids or [])
        self.printed = tokenizer.decode(self.ids) if self.ids else ""

    def _diff(self, text: str) -> str:
        common = 0  # length of the prefix already printed (all of it, unless the decoder rewrote earlier text)
        if text.startswith(self.printed):
            common = len(self.printed)
        else:
            while common < min(len(text), len(self.printed)) and text[common] == self.printed[common]:
                common += 1
        self.printed = text
        return text[common:]

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        return self._diff(text.rstrip("\ufffd"))

    def flush(self) -> str:
        """Return the rest of the text, partial characters included."""
        return self._diff(self.tokenizer.decode(self.ids)) if self.ids else ""


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
        ids = list(start_ids)
        while not long_enough(tokenizer, ids[len(start_ids) :], cfg.passage_chars):
            # Chunks of at most 256 tokens (a BPE token is several characters), each stopped once the text is long
            # enough: the tokens drawn and the text written are those of drawing the whole chunk.
            for nxt in stream(model, torch.tensor([ids], device=device), 256, **kw):
                ids.append(int(nxt))
                if long_enough(tokenizer, ids[len(start_ids) :], cfg.passage_chars):
                    break
        passages.append(tokenizer.decode(ids[len(start_ids) :])[: cfg.passage_chars])
    return passages


def long_enough(tokenizer, ids: list[int], chars: int) -> bool:
    """Whether `ids` decode to at least `chars` characters that no later token can change: complete characters (a
    byte-level token that ends inside a UTF-8 character decodes to U+FFFD until the next one completes it)."""
    return len(tokenizer.decode(ids).rstrip("\ufffd")) >= chars


def format_samples(texts: list[str], fmt: str) -> str:
    """The text of a samples file: names one per line, passages separated by :data:`PASSAGE_SEPARATOR`."""
    return ("\n" if fmt == "lines" else PASSAGE_SEPARATOR).join(texts) + "\n"


def parse_samples(text: str, fmt: str) -> list[str]:
    """The samples of a file written by :func:`format_samples` (its exact inverse)."""
    return text.removesuffix("\n").split("\n" if fmt == "lines" else PASSAGE_SEPARATOR)
