"""Tokenizers: characters or byte-level BPE, both as Hugging Face `tokenizers.Tokenizer` objects.

A tokenizer is trained on a corpus's train split only, then every split is encoded into one flat
array of token ids, written as raw ``<split>.bin`` (``np.memmap``-able, nanoGPT style)::

    tokenizers/<name>/
        tokenizer.json    # the HF tokenizer; `load_tokenizer` reads it back
        train.bin         # ids of the train split (dtype in stats.json: uint16, or uint32 if vocab > 65536)
        val.bin           # ... and every other split the corpus has (test for names)
        stats.json        # kind, format, vocab_size, dtype, boundary_id, per-split tokens/characters/oov

Stream layout. 'text' corpora: the ids of the whole split text, encoded in one piece (chunking could
change BPE merges at chunk edges). 'lines' corpora (names): every name is encoded on its own and
the names are joined by the boundary '.', with one boundary at the start and one at the end, as in
makemore: ``.emma.olivia.`` -> 13 tokens. A model trained on this stream predicts the first letter
after a '.' and the '.' after the last letter; its tokens - 1 targets are exactly makemore's bigrams.

char: one token per character, no normalisation, nothing dropped: the vocabulary is the distinct
characters of the train split in code-point order ('lines': '.' first, so names give '.'=0,
'a'..'z'=1..26). A val/test character missing from train is an error (``oov='error'``), or maps to
an extra last token '[UNK]' (``oov='unk'``), added only when some split needs it and counted in stats.

bpe: GPT-2 style byte-level BPE (Radford et al. 2019): text -> UTF-8 bytes, each byte one of 256
base tokens, then learned merges. Every string round-trips exactly; no special tokens are added.

The library never reads params or argv; stages pass a `TokenizerConfig` in.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lm.atomic import atomic_dir
from lm.config import TokenizerConfig

BOUNDARY = "."
"""Boundary token between (and around) the examples of a 'lines' corpus."""
UNK = "[UNK]"
"""Token for out-of-vocabulary characters (char tokenizers with oov='unk' only)."""
# Every single code point is its own pre-token. (Oniguruma has no (?s) flag; [\s\S] matches newlines too.)
_ONE_CHAR = Regex(r"[\s\S]")


class TokenizerError(ValueError):
    """A corpus cannot be tokenized as configured (the message names the problem and the fix)."""


# ----------------------------------------------------------------------------------------------
# training


def _char_tokenizer(chars: list[str]) -> Tokenizer:
    """A tokenizer with exactly one token per character, ids in the order given."""
    vocab = {c: i for i, c in enumerate(chars)}
    # WordLevel with an unk_token that is absent from the vocab raises on unknown input ("Missing
    # [UNK] token") instead of dropping it silently, so 'error' mode has a backstop below our checks.
    # [UNK] is a plain vocab entry, not an added token: a literal "[UNK]" in the text stays 5 chars.
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(_ONE_CHAR, behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between tokens (the default decode adds them)
    return tok


def _bpe_tokenizer(vocab_size: int, texts: list[str]) -> Tokenizer:
    """Byte-level BPE trained on `texts` (GPT-2 pre-tokenizer regex, no prefix space, no special tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no invented leading space
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in train or not
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    missing = set(pre_tokenizers.ByteLevel.alphabet()) - set(tok.get_vocab())
    if missing:  # never expected; without every byte some text could not be encoded
        raise TokenizerError(f"byte-level BPE vocabulary lacks {len(missing)} of the 256 byte tokens")
    return tok


def train_tokenizer(cfg: TokenizerConfig, splits: dict[str, list[str]], fmt: str) -> Tokenizer:
    """Build the tokenizer `cfg` describes from ``splits['train']``.

    The other splits are only looked at by char tokenizers with ``oov='unk'``, to add the [UNK]
    token when (and only when) one of them has a character the train split lacks.
    BPE may learn fewer merges than asked on a small corpus: check ``get_vocab_size()``.
    """
    _check_format(fmt)
    if not splits.get("train"):
        raise TokenizerError(f"no (or an empty) train split to learn from; got splits {sorted(splits)}")
    train = splits["train"]
    if fmt == "lines":
        _check_no_boundary(train, "train split")
    if cfg.kind == "bpe":
        assert cfg.vocab_size is not None  # the config validator guarantees it
        return _bpe_tokenizer(cfg.vocab_size, train)
    seen = set().union(*map(set, train))
    if fmt == "lines":
        chars = [BOUNDARY] + sorted(seen)
    else:
        chars = sorted(seen)
    if cfg.oov == "unk" and any(_char_oov(set(chars), texts) for s, texts in splits.items() if s != "train"):
        chars.append(UNK)
    return _char_tokenizer(chars)


# ----------------------------------------------------------------------------------------------
# encoding


def _check_format(fmt: str) -> None:
    if fmt not in ("lines", "text"):
        raise TokenizerError(f"unknown corpus format {fmt!r}; must be 'lines' or 'text'")


def _check_no_boundary(lines: list[str], where: str) -> None:
    bad = sum(BOUNDARY in line for line in lines)
    if bad:
        raise TokenizerError(
            f"{where}: {bad} lines contain the boundary character {BOUNDARY!r}, which would make the "
            f"token stream ambiguous; remove it from the corpus or use format 'text'"
        )


def is_char(tok: Tokenizer) -> bool:
    return isinstance(tok.model, models.WordLevel)


def unk_id(tok: Tokenizer) -> int | None:
    """Id of [UNK] in a char tokenizer that has one, else None (a BPE could learn "[UNK]" as a merge)."""
    return tok.token_to_id(UNK) if is_char(tok) else None


def _char_oov(vocab: set[str], texts: list[str]) -> Counter[str]:
    """Characters of `texts` not in `vocab`, with counts."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(t)  # Counter counts a string in C
    return Counter({c: n for c, n in counts.items() if c not in vocab})


def oov_chars(tok: Tokenizer, texts: list[str]) -> Counter[str]:
    """Characters of `texts` the tokenizer has no token of their own for (byte-level BPE: none)."""
    return _char_oov(set(tok.get_vocab()), texts) if is_char(tok) else Counter()


def _format_oov(counts: Counter[str]) -> str:
    return ", ".join(f"{c!r} x{n}" for c, n in counts.most_common())


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def boundary_id(tok: Tokenizer) -> int:
    """Id of the '.' boundary (char 'lines' tokenizers: 0; byte-level BPE: the '.' byte token)."""
    ids = tok.encode(BOUNDARY, add_special_tokens=False).ids
    if len(ids) != 1:
        raise TokenizerError(f"the boundary {BOUNDARY!r} is not a single token of this tokenizer (got {ids})")
    return ids[0]


def encode_split(tok: Tokenizer, texts: list[str], fmt: str) -> np.ndarray:
    """Token ids of one split as a flat array ('text': the texts joined; 'lines': '.a.b.' layout).

    Raises TokenizerError if a char tokenizer without [UNK] meets an unknown character, rather
    than letting anything be dropped.
    """
    _check_format(fmt)
    if unk_id(tok) is None and (missing := oov_chars(tok, texts)):
        raise TokenizerError(f"characters not in the vocabulary: {_format_oov(missing)}")
    dtype = id_dtype(tok.get_vocab_size())
    if fmt == "text":
        # One call on the whole text: BPE pre-tokenizes with a regex, so any cut could split a word.
        return np.array(tok.encode("".join(texts), add_special_tokens=False).ids, dtype=dtype)
    _check_no_boundary(texts, "lines to encode")
    b = boundary_id(tok)
    ids = [b]
    for enc in tok.encode_batch(texts, add_special_tokens=False):  # each line alone: no merges across '.'
        ids.extend(enc.ids)
        ids.append(b)
    return np.array(ids, dtype=dtype)


def split_text(texts: list[str], fmt: str) -> str:
    """The string a split's ids decode to: the text itself, or '.' + 'line.' for every line (".emma.olivia.")."""
    return "".join(texts) if fmt == "text" else BOUNDARY + "".join(t + BOUNDARY for t in texts)


# ----------------------------------------------------------------------------------------------
# the whole corpus, on disk


def _encoded(tok: Tokenizer, texts: list[str], fmt: str, oov: Counter, what: str) -> np.ndarray:
    """The split's token ids, checked to decode back to exactly its text (its OOV characters as [UNK])."""
    ids = encode_split(tok, texts, fmt)
    text = split_text(texts, fmt)
    expected = text.translate({ord(c): UNK for c in oov}) if oov else text
    decoded = tok.decode(ids.tolist(), skip_special_tokens=False)
    if decoded != expected:
        at = next((i for i, (a, b) in enumerate(zip(decoded, expected)) if a != b), min(len(decoded), len(expected)))
        raise TokenizerError(
            f"{what} does not round-trip (first difference at character {at}: "
            f"{expected[at : at + 20]!r} came back as {decoded[at : at + 20]!r})"
        )
    return ids


def tokenize_corpus(
    cfg: TokenizerConfig, splits: dict[str, list[str]], fmt: str, out_dir: Path, *, name: str = "<name>"
) -> dict:
    """Train on the train split, encode and verify every split, write `out_dir` atomically; return stats.

    `name` (the tokenizer's key in params) only makes error messages point at the right setting.
    Every split must decode back to exactly its text (OOV characters mapped to [UNK] aside), or
    TokenizerError is raised and nothing is written.
    """
    if fmt == "lines":  # every split up front, so the error names the split
        for split, texts in splits.items():
            _check_no_boundary(texts, f"tokenizer {name!r}: {split} split")
    tok = train_tokenizer(cfg, splits, fmt)

    oov = {split: oov_chars(tok, texts) for split, texts in splits.items()}
    if unk_id(tok) is None and any(oov.values()):
        where = "; ".join(f"{s}: {_format_oov(c)}" for s, c in oov.items() if c)
        raise TokenizerError(
            f"tokenizer {name!r}: characters missing from the train split ({where}); "
            f"set tokenizers.{name}.oov: unk in params.yaml to map them to {UNK}"
        )

    n_vocab = tok.get_vocab_size()
    stats: dict = {
        "corpus": cfg.corpus,
        "kind": cfg.kind,
        "format": fmt,
        "vocab_size": n_vocab,  # actual; BPE may fall short of the requested size on small corpora
        "requested_vocab_size": cfg.vocab_size,
        "oov_policy": cfg.oov if cfg.kind == "char" else None,
        "unk_id": unk_id(tok),
        "dtype": id_dtype(n_vocab).name,
        "boundary_id": boundary_id(tok) if fmt == "lines" else None,
        "splits": {},
    }
    arrays = {
        split: _encoded(tok, texts, fmt, oov[split], f"tokenizer {name!r}: {split} split")
        for split, texts in splits.items()
    }
    for split, texts in splits.items():
        text = split_text(texts, fmt)
        stats["splits"][split] = {
            "tokens": int(arrays[split].size),
            "characters": len(text),  # what bpc divides by; 'lines': the names plus every boundary
            "chars_per_token": round(len(text) / max(arrays[split].size, 1), 4),
            "oov": sum(oov[split].values()),
            "oov_chars": dict(oov[split].most_common()),
        }

    with atomic_dir(out_dir) as tmp:  # a sibling temp dir renamed into place: never half-written
        tok.save(str(tmp / "tokenizer.json"))
        for split, ids in arrays.items():
            ids.tofile(tmp / f"{split}.bin")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats


def load_tokenizer(dir: str | Path) -> Tokenizer:
    """The tokenizer saved by `tokenize_corpus` in `dir`."""
    return Tokenizer.from_file(str(Path(dir) / "tokenizer.json"))


def load_stats(dir: str | Path) -> dict:
    """stats.json of a tokenized corpus."""
    return json.loads((Path(dir) / "stats.json").read_text(encoding="utf-8"))


def load_ids(dir: str | Path, split: str) -> np.ndarray:
    """Token ids of one split as a read-only np.memmap (no copy, nothing loaded until used)."""
    dir = Path(dir)
    stats = load_stats(dir)
    if split not in stats["splits"]:
        raise FileNotFoundError(f"{dir}: no split {split!r}; available: {', '.join(stats['splits'])}")
    path, dtype, n = dir / f"{split}.bin", np.dtype(stats["dtype"]), stats["splits"][split]["tokens"]
    if path.stat().st_size != n * dtype.itemsize:
        raise ValueError(
            f"{path}: {path.stat().st_size} bytes, expected {n} {dtype.name} tokens; re-run the tokenize stage"
        )
    if n == 0:  # np.memmap refuses empty files
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
