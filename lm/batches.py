"""Batches of (inputs, targets) drawn from the memory-mapped token files, for every family.

Two layouts, one interface:

* ``text`` corpora are one token stream. A window is ``x = ids[i : i+T]``, ``y = ids[i+1 : i+T+1]``
  (nanoGPT). Families with a fixed receptive field of ``k`` tokens (bigrams, MLP, WaveNet) pad the
  window's left edge themselves, so the first ``k-1`` targets of a window that does not start the
  stream would be scored with a made-up context: those targets are masked (-1) and consecutive
  evaluation windows overlap by ``k-1`` tokens, so every token is scored exactly once, with its true
  context. Attention families see only their window (``overlap = 0``), as nanoGPT evaluates.
* ``lines`` corpora (names) are stored as ``.emma.olivia.`` with the boundary ``.`` = id 0. Each name
  is one row ``x = .emma``, ``y = emma.``, right-padded (x with the boundary, y with -1) to the longest
  name of the split. Every position of ``.name.`` is a prediction and no context crosses names;
  fixed-context families pad the left edge with id 0 = ``.``, which is exactly makemore's ``...``.
  Evaluation (`iterate`) scores these rows. Training batches (`sample`) of attention families are random
  rows; those of fixed-context families (receptive field k) are makemore's: ``batch_size`` (context,
  target) examples drawn uniformly from every position of every name, each a row ``x`` = its k context
  ids, ``y`` = -1 but the last (its target), so a batch of 32 is 32 examples and no padding enters
  BatchNorm (lm.models.base.WindowMLP computes only the positions with a target).

Targets equal to IGNORE_INDEX (-1) are left out of every loss and score.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lm.families import ModelConfig
from lm.models.base import IGNORE_INDEX


class BatchError(ValueError):
    """A split cannot be batched with the requested shape (too short, names too long, ...)."""


@dataclass
class Batches:
    """Batches from one split.

    ids: the split's token ids (a read-only memmap is fine).
    fmt: 'lines' or 'text' (the corpus format).
    seq_len: window length T for 'text' (ignored for 'lines', whose rows are as long as the longest name).
    overlap: for 'text', targets masked at the start of a window that is not the stream's start
        (the model's receptive field minus one for fixed-context families, 0 for attention).
    boundary_id: the boundary token of 'lines' corpora.
    max_len: refuse 'lines' rows longer than this (an attention model's block_size).
    name: what the ids are, for error messages (default: the split named by the memmap's file, see `describe`).
    """

    ids: np.ndarray
    fmt: str
    seq_len: int
    overlap: int = 0
    boundary_id: int | None = None
    max_len: int | None = None
    name: str | None = None
    examples: int | None = None
    """'lines' only: sample (context, target) examples with this many context ids instead of whole names."""

    def __post_init__(self) -> None:
        if self.fmt == "lines":
            self._rows_x, self._rows_y = self._name_rows()
            if self.examples:
                self._ex_x, self._ex_y = self._name_examples(self.examples)
            if self.max_len is not None and self._rows_x.shape[1] > self.max_len:
                raise BatchError(
                    f"the longest name needs {self._rows_x.shape[1]} positions ('.' + name) but the model's "
                    f"block_size is {self.max_len}: set model.block_size >= {self._rows_x.shape[1]}"
                )
        elif self.fmt == "text":
            if self.overlap >= self.seq_len:
                raise BatchError(f"window of {self.seq_len} tokens cannot overlap by {self.overlap}")
            if len(self.ids) < self.seq_len + 1:
                raise BatchError(
                    f"{self.name or describe(self.ids)} has {_tokens(len(self.ids))}, fewer than one window of "
                    f"{self.seq_len}+1: use a smaller block_size or a larger split"
                )
        else:
            raise ValueError(f"unknown corpus format {self.fmt!r}")

    # -- lines ------------------------------------------------------------------------------------

    def _name_rows(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.ids, dtype=np.int64)
        if self.boundary_id is None:
            raise ValueError("'lines' batches need the boundary token id")
        bounds = np.flatnonzero(ids == self.boundary_id)
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != len(ids) - 1:
            raise BatchError("a 'lines' split must look like .name.name. (boundary first and last)")
        starts, ends = bounds[:-1], bounds[1:]  # name i is ids[starts[i] : ends[i] + 1] = ".name."
        width = int((ends - starts).max())
        n = len(starts)
        x = np.full((n, width), self.boundary_id, dtype=np.int64)
        y = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
        for i, (s, e) in enumerate(zip(starts, ends)):
            x[i, : e - s] = ids[s:e]  # .emma
            y[i, : e - s] = ids[s + 1 : e + 1]  # emma.
        return x, y

    def _name_examples(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every (context, target) pair of the split: (N, k) context ids (the boundary before a name's start,
        makemore's '...') and (N,) targets, N = every scored position of every name."""
        pad = np.full((len(self._rows_x), k - 1), self.boundary_id, dtype=np.int64)
        padded = np.concatenate([pad, self._rows_x], axis=1)  # (n, k-1+width)
        windows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=1)  # (n, width, k)
        scored = self._rows_y != IGNORE_INDEX  # (n, width)
        return np.ascontiguousarray(windows[scored]), self._rows_y[scored]  # (N, k), (N,)

    # -- common -----------------------------------------------------------------------------------

    @property
    def num_targets(self) -> int:
        """Targets scored by one pass of `iterate` (every token but the split's first)."""
        if self.fmt == "lines":
            return int((self._rows_y != IGNORE_INDEX).sum())
        return len(self.ids) - 1

    def sample(
        self, rng: np.random.Generator, batch_size: int, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch drawn from `rng`: text, random windows (of `length` tokens instead of seq_len, for a
        window-length warm-up); names, random (context, target) examples (``examples``) or random names."""
        if length is not None and (self.fmt != "text" or not 0 < length <= self.seq_len):
            raise BatchError(f"windows of {length} tokens: only text windows of 1 to seq_len ({self.seq_len}) can be "
                             "sampled shorter")  # fmt: skip
        if self.fmt == "lines" and self.examples:
            picks = rng.integers(0, len(self._ex_y), size=batch_size)
            y = np.full((batch_size, self.examples), IGNORE_INDEX, dtype=np.int64)
            y[:, -1] = self._ex_y[picks]  # (B, k): one target per row, after its full context
            return torch.from_numpy(self._ex_x[picks]), torch.from_numpy(y)
        if self.fmt == "lines":
            rows = rng.integers(0, len(self._rows_x), size=batch_size)
            return torch.from_numpy(self._rows_x[rows]), torch.from_numpy(self._rows_y[rows])
        starts = rng.integers(0, len(self.ids) - (length or self.seq_len), size=batch_size)
        return self._windows(starts, length)

    def eval_subset(self, rng: np.random.Generator, batch_size: int, n_batches: int) -> list:
        """The training loop's fixed val subset: `n_batches` random batches drawn once from `rng` (a quick estimate
        of the val loss; the evaluate stage scores the whole split)."""
        return [self.sample(rng, batch_size) for _ in range(n_batches)]

    def iterate(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split in a fixed order, each target scored exactly once."""
        if self.fmt == "lines":
            for i in range(0, len(self._rows_x), batch_size):
                yield (
                    torch.from_numpy(self._rows_x[i : i + batch_size]),
                    torch.from_numpy(self._rows_y[i : i + batch_size]),
                )
            return
        T, stride, n = self.seq_len, self.seq_len - self.overlap, len(self.ids)
        starts = np.arange(0, n - 1 - self.overlap, stride)  # windows whose targets reach ids[n-1]
        full = starts[starts + T + 1 <= n]
        for i in range(0, len(full), batch_size):
            yield self._windows(full[i : i + batch_size])
        if len(full) < len(starts):  # the tail: one shorter window
            yield self._windows(starts[len(full) :][:1], length=n - 1 - int(starts[len(full)]))

    def chunks(self, n_ctx: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """llama.cpp's perplexity protocol (its llama-perplexity tool), for comparing with it: the split cut into
        non-overlapping windows of ``n_ctx`` tokens (a partial last one dropped), each scored on its second half only,
        the targets of positions n_ctx // 2 .. n_ctx - 2 (the window's own tokens; none from the next window)."""
        if self.fmt != "text":
            raise BatchError("llama.cpp's perplexity protocol reads one token stream: a 'text' split")
        n = len(self.ids) // n_ctx
        if n < 2:
            raise BatchError(f"{self.name or describe(self.ids)} has {_tokens(len(self.ids))}: llama.cpp's "
                             f"protocol needs at least 2 windows of {n_ctx}")  # fmt: skip
        ids = np.asarray(self.ids[: n * n_ctx], dtype=np.int64).reshape(n, n_ctx)  # (chunks, n_ctx)
        y = np.full_like(ids, IGNORE_INDEX)
        first = n_ctx // 2
        y[:, first : n_ctx - 1] = ids[:, first + 1 :]  # position j predicts token j + 1 of the same window
        for i in range(0, n, batch_size):
            yield torch.from_numpy(ids[i : i + batch_size]), torch.from_numpy(y[i : i + batch_size])

    def _windows(self, starts: np.ndarray, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        T = length or self.seq_len
        chunks = np.stack([np.asarray(self.ids[s : s + T + 1], dtype=np.int64) for s in starts])
        x, y = chunks[:, :-1].copy(), chunks[:, 1:].copy()  # (B, T) each
        if self.overlap:
            y[starts > 0, : self.overlap] = IGNORE_INDEX  # their context starts before the window
        return torch.from_numpy(x), torch.from_numpy(y)


TEXT_WINDOW = 128
"""Window length for fixed-context families on text: long windows amortise the k-1 masked targets."""


def _tokens(n: int) -> str:
    return f"{n:,} token{'' if n == 1 else 's'}"


def _split_and_file(ids: np.ndarray, split: str | None) -> tuple[str | None, str | None]:
    file = getattr(ids, "filename", None)  # np.memmap keeps the path it maps (tokenizers/<name>/<split>.bin)
    return split or (Path(file).stem if file else None), file


def describe(ids: np.ndarray, split: str | None = None) -> str:
    """How error messages name a split: 'val split (/path/tokenizers/x/val.bin)' for the memmaps that
    `lm.tokenizer.load_ids` returns, 'val split' when only the name is known, else 'the split'."""
    split, file = _split_and_file(ids, split)
    if not split:
        return "the split"
    return f"{split} split ({file})" if file else f"{split} split"


def for_model(
    model_cfg: ModelConfig, ids: np.ndarray, fmt: str, boundary_id: int | None, *, split: str | None = None
) -> Batches:
    """Batches shaped for a family's declared ``context``: 'window' families get windows of their block_size;
    'fixed' families (receptive field k = block_size) get long windows overlapping by k-1, as long as the
    split allows (a short split gets one window of the whole split), and on names (context, target) examples.

    A 'text' split needs at least block_size + 1 tokens (one context and its target), or BatchError
    names the split (`split`, or the file of a memmap), its length and the block_size that would fit.
    """
    k = model_cfg.block_size
    name = describe(ids, split)
    if fmt == "text" and len(ids) < k + 1:
        n, split = len(ids), _split_and_file(ids, split)[0]
        more = f"give the split more text (a larger {split or 'split'} fraction or a larger corpus)"
        settable = "block_size" in type(model_cfg).model_fields
        fix = f"set model.block_size <= {n - 1}, or {more}" if settable and n >= 2 else more
        raise BatchError(
            f"{name} has {_tokens(n)}, fewer than block_size + 1 = {k + 1} (one window of {k} context "
            f"token{'' if k == 1 else 's'} and its target): {fix}"
        )
    if model_cfg.context == "fixed":
        seq_len = max(TEXT_WINDOW, 2 * k)
        if fmt == "text":
            seq_len = min(seq_len, len(ids) - 1)  # >= k, checked above: longer than the k-1 overlap
        return Batches(
            ids, fmt, seq_len=seq_len, overlap=k - 1, boundary_id=boundary_id, name=name,
            examples=k if fmt == "lines" else None,
        )  # fmt: skip
    return Batches(
        ids, fmt, seq_len=model_cfg.block_size, boundary_id=boundary_id, max_len=model_cfg.block_size, name=name
    )
