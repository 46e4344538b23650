"""Labelled corpora (format 'labelled', for fine-tuning a classifier): one ``label<TAB>text`` example a line.

Parsing is strict and line-numbered, so a bad file names the line to fix: a line that is not UTF-8, has no tab,
carries a label that ``labels`` does not list, or has no text is a DataError before anything is written. The
text keeps every further tab. The split follows the SMS spam chapter of Raschka's "Build a Large Language Model
(From Scratch)": every label optionally down-sampled to the rarest one's count (``balance``), then
``floor(n * train)`` examples for training, ``floor(n * val)`` for validation and the rest for test (5,574 SMS
messages, 747 spam: 1,494 balanced → 1,045 / 149 / 300), here stratified by label so each split keeps the labels'
shares (scikit-learn's ``train_test_split``), all with the study seed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from lm.config import CorpusConfig
from lm.data import DataError

Example = tuple[str, str]
"""(label, text)."""


def parse_labelled(raw: bytes, cfg: CorpusConfig, where: str = "corpora.<name>") -> list[Example]:
    """The (label, text) examples of `raw`, in file order; CRLF line ends and a leading BOM are removed as
    ``cfg.clean`` says, empty lines are skipped, anything else that is not ``label<TAB>text`` is a DataError that
    names its line (1-based)."""
    labels = cfg.labels or []
    if cfg.clean.strip_bom and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out: list[Example] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if cfg.clean.normalize_newlines and line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"line {number} is not UTF-8 ({e.reason} at column {e.start + 1}: {line[e.start : e.start + 4]!r}); "
                f"a labelled corpus must be UTF-8: re-encode the file and update {where}.sha256"
            ) from None
        label, tab, body = text.partition("\t")
        if not tab:
            raise DataError(f"line {number} has no tab between its label and its text: {_excerpt(text)}")
        if label not in labels:
            raise DataError(
                f"line {number}: label {label!r} is not one of {labels}: fix the line or add the label to "
                f"{where}.labels"
            )
        if not body.strip():
            raise DataError(f"line {number} ({label!r}) has no text after its tab")
        out.append((label, body))
    if not out:
        raise DataError(f"no labelled lines; point {where}.url and {where}.sha256 at a label<TAB>text file")
    return out


def _excerpt(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def split_labelled(examples: list[Example], cfg: CorpusConfig, seed: int) -> dict[str, list[Example]]:
    """``{"train", "val"[, "test"]: [(label, text), ...]}``: balanced if ``cfg.balance``, cut by floor(n·fraction)
    for train and val (test the rest), stratified by label, each split in a seeded random order."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {x: [] for x in cfg.labels or []}
    for i, (label, _) in enumerate(examples):
        by_label[label].append(i)
    if missing := [x for x, idx in by_label.items() if not idx]:
        raise DataError(f"label(s) {missing} have no example; every label of the corpus needs some")
    if cfg.balance:
        rarest = min(map(len, by_label.values()))
        by_label = {x: sorted(rng.choice(idx, rarest, replace=False).tolist()) for x, idx in by_label.items()}
    keep = sorted(i for idx in by_label.values() for i in idx)
    y = [examples[i][0] for i in keep]
    n = len(keep)
    n_train, n_val = int(n * cfg.split.train + 1e-9), int(n * cfg.split.val + 1e-9)
    n_test = n - n_train - n_val if cfg.split.test > 0 else 0
    if cfg.split.test == 0:
        n_val = n - n_train
    state = int(rng.integers(2**31))
    try:
        rest, test = train_test_split(keep, test_size=n_test, stratify=y, random_state=state) if n_test else (keep, [])
        y_rest = [examples[i][0] for i in rest]
        train, val = train_test_split(rest, test_size=n_val, stratify=y_rest, random_state=state)
    except ValueError as e:  # too few examples of a label for the stratified cut
        raise DataError(
            f"cannot split {n} examples ({dict(Counter(y))}) into train {n_train} / val {n_val} / test {n_test} "
            f"with every label in every split ({e}); use a larger corpus or other split fractions"
        ) from None
    parts = {"train": train, "val": val} | ({"test": test} if n_test else {})
    return {name: [examples[i] for i in idx] for name, idx in parts.items()}


def label_stats(split: list[Example]) -> dict[str, Any]:
    """Examples per label of one split (stats.json)."""
    return dict(sorted(Counter(label for label, _ in split).items()))
