"""Tokenizers: vocabularies, exact round trips on the real corpora, OOV handling, layout, the stage."""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.config import TokenizerConfig
from lm.tokenizer import (
    UNK,
    TokenizerError,
    encode_split,
    id_dtype,
    load_ids,
    load_stats,
    load_tokenizer,
    split_text,
    tokenize_corpus,
    train_tokenizer,
)

from helpers import run
from tiny import FIXTURE_CORPORA as CORPORA

ROOT = Path(__file__).resolve().parents[1]
FORMAT = {"names": "lines", "shakespeare": "text", "oz": "text"}


def char(corpus: str = "c", oov: str = "error") -> TokenizerConfig:
    return TokenizerConfig(corpus=corpus, kind="char", oov=oov)


def bpe(vocab_size: int, corpus: str = "c") -> TokenizerConfig:
    return TokenizerConfig(corpus=corpus, kind="bpe", vocab_size=vocab_size)


@functools.cache
def corpus(name: str) -> dict[str, list[str]]:
    """The study's splits of the fixture corpora, built here so these tests do not depend on lm/data.py."""
    file = {"names": "names.txt", "shakespeare": "tinyshakespeare.txt", "oz": "wonderful_wizard_of_oz.txt"}[name]
    text = (CORPORA / file).read_text(encoding="utf-8")
    if name == "names":
        names = text.split()
        random.Random(1337).shuffle(names)
        a, b = int(0.8 * len(names)), int(0.9 * len(names))
        return {"train": names[:a], "val": names[a:b], "test": names[b:]}
    # Oz: the cleaning the fetch stage does (BOM, CRLF, Gutenberg header/footer), roughly.
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if "*** START OF" in text:
        text = text[text.index("\n", text.index("*** START OF")) + 1 : text.find("*** END OF")]
    n = int(0.9 * len(text))
    return {"train": [text[:n]], "val": [text[n:]]}


def check_round_trip(out: Path, splits: dict[str, list[str]], fmt: str) -> dict:
    """Reload what tokenize_corpus wrote and check every split decodes to its exact text."""
    stats, tok = load_stats(out), load_tokenizer(out)
    assert set(stats["splits"]) == set(splits)
    for split, texts in splits.items():
        ids = load_ids(out, split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.dtype(stats["dtype"])
        assert ids.size == stats["splits"][split]["tokens"]
        text = split_text(texts, fmt)
        assert tok.decode(ids.tolist()) == text
        assert stats["splits"][split]["characters"] == len(text)
        assert stats["splits"][split]["oov"] == 0
    return stats


# ----------------------------------------------------------------------------------------------
# vocabularies


def test_names_char_vocab_is_makemore(tmp_path):
    stats = tokenize_corpus(char("names"), corpus("names"), "lines", tmp_path / "t")
    vocab = load_tokenizer(tmp_path / "t").get_vocab()
    assert stats["vocab_size"] == len(vocab) == 27
    assert vocab["."] == 0 and vocab["a"] == 1 and vocab["z"] == 26
    assert stats["boundary_id"] == 0 and stats["unk_id"] is None and stats["dtype"] == "uint16"
    # The names and their boundaries: tokens - 1 per split are the makemore bigrams, len(name) + 1 per name
    # (228,146 on the whole names.txt: metrics/names-*.json count them on the real corpus).
    names = [n for texts in corpus("names").values() for n in texts]
    assert sum(s["tokens"] - 1 for s in stats["splits"].values()) == sum(len(n) + 1 for n in names) == 14_035
    check_round_trip(tmp_path / "t", corpus("names"), "lines")


def test_shakespeare_char_vocab_is_its_characters():
    """One token per distinct training character (65 on the whole Tiny Shakespeare, 58 on the fixture)."""
    tok = train_tokenizer(char("shakespeare"), corpus("shakespeare"), "text")
    vocab = tok.get_vocab()
    assert len(vocab) == len(set(corpus("shakespeare")["train"][0])) == 58
    assert [c for c, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == sorted(vocab)  # code-point order
    assert vocab["\n"] == 0 and vocab[" "] == 1


def test_char_is_one_token_per_character_without_normalisation():
    text = "e\u0301 é\t\u00a0\u2028\r\n  \x00😀[UNK]<|endoftext|>"  # decomposed/composed é, odd spaces, astral
    tok = train_tokenizer(char(), {"train": [text]}, "text")
    ids = encode_split(tok, [text], "text")
    assert ids.size == len(text)
    assert tok.decode(ids.tolist()) == text
    assert [tok.id_to_token(i) for i in ids.tolist()] == list(text)


# ----------------------------------------------------------------------------------------------
# round trips on the corpora (their fixture excerpts)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("names", char("names")),
        ("names", bpe(512, "names")),
        ("shakespeare", char("shakespeare")),
        ("shakespeare", bpe(512, "shakespeare")),
        ("oz", char("oz")),
        ("oz", bpe(512, "oz")),
        ("oz", bpe(2048, "oz")),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v.kind}{v.vocab_size or ''}",
)
def test_real_corpus_round_trips(tmp_path, name, cfg):
    splits = corpus(name)
    stats = tokenize_corpus(cfg, splits, FORMAT[name], tmp_path / "t")
    check_round_trip(tmp_path / "t", splits, FORMAT[name])
    if cfg.kind == "bpe":
        assert stats["vocab_size"] == stats["requested_vocab_size"] == cfg.vocab_size  # honoured exactly
        assert all(s["chars_per_token"] > 1.3 for s in stats["splits"].values())  # merges do compress
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(
        ["tokenizer.json", "stats.json", *(f"{s}.bin" for s in splits)]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temp dirs left behind


# ----------------------------------------------------------------------------------------------
# layout, dtype, sizes


@pytest.mark.parametrize("cfg", [char(), bpe(300)], ids=["char", "bpe"])
def test_lines_layout(cfg):
    splits = {"train": ["emma", "olivia", "ava", "emma"], "val": ["emma", "olivia"]}
    tok = train_tokenizer(cfg, splits, "lines")
    ids = encode_split(tok, splits["val"], "lines")
    b = tok.token_to_id(".")
    per_name = [tok.encode(n).ids for n in splits["val"]]
    assert ids.tolist() == [b, *per_name[0], b, *per_name[1], b]
    assert tok.decode(ids.tolist()) == ".emma.olivia."
    if cfg.kind == "char":
        assert ids.tolist() == [0, 2, 5, 5, 1, 0, 6, 4, 3, 7, 3, 1, 0]  # . a e i l m o v


def test_lines_reject_the_boundary_inside_a_line():
    with pytest.raises(TokenizerError, match="boundary"):
        train_tokenizer(char(), {"train": ["jo.ann"], "val": ["ann"]}, "lines")


def test_dtype():
    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.uint32
    # > 65,536 distinct characters: ids no longer fit uint16.
    chars = "".join(chr(c) for c in range(0x20, 0x20 + 70_000) if not 0xD800 <= c < 0xE000)
    tok = train_tokenizer(char(), {"train": [chars]}, "text")
    ids = encode_split(tok, [chars[::-1]], "text")
    assert tok.get_vocab_size() > 65536 and ids.dtype == np.uint32 and ids.max() == tok.get_vocab_size() - 1
    assert tok.decode(ids.tolist()) == chars[::-1]


def test_bpe_small_corpus_records_actual_vocab_size(tmp_path):
    stats = tokenize_corpus(bpe(1000), {"train": ["ab ab abc"], "val": ["xyz"]}, "text", tmp_path / "t")
    assert stats["requested_vocab_size"] == 1000 and stats["vocab_size"] == 256 + 3 < 1000
    assert load_tokenizer(tmp_path / "t").get_vocab_size() == stats["vocab_size"]


def test_bpe_is_deterministic():
    text = corpus("oz")["train"][0][:50_000]
    a = train_tokenizer(bpe(600), {"train": [text]}, "text").to_str()
    assert a == train_tokenizer(bpe(600), {"train": [text]}, "text").to_str()


# ----------------------------------------------------------------------------------------------
# out-of-vocabulary characters


def test_oov_error_names_chars_split_and_fix(tmp_path):
    splits = {"train": ["abc abc"], "val": ["abd éé"], "test": ["a"]}
    with pytest.raises(TokenizerError) as e:
        tokenize_corpus(char(), splits, "text", tmp_path / "t", name="tiny-char")
    msg = str(e.value)
    assert "val" in msg and "'d' x1" in msg and "'é' x2" in msg and "test" not in msg
    assert "tokenizers.tiny-char.oov: unk" in msg
    assert not (tmp_path / "t").exists()
    tok = train_tokenizer(char(), splits, "text")  # encode_split alone refuses too: nothing dropped
    with pytest.raises(TokenizerError, match="'d'"):
        encode_split(tok, ["abd"], "text")


def test_oov_unk_maps_and_counts(tmp_path):
    splits = {"train": ["emma", "ava"], "val": ["eve", "zoë"], "test": ["ava"]}
    stats = tokenize_corpus(char(oov="unk"), splits, "lines", tmp_path / "t")
    tok = load_tokenizer(tmp_path / "t")
    assert stats["vocab_size"] == 6 and stats["unk_id"] == 5 and tok.token_to_id(UNK) == 5  # . a e m v [UNK]
    val = stats["splits"]["val"]
    assert val["oov"] == 3 and val["oov_chars"] == {"z": 1, "o": 1, "ë": 1}
    assert val["characters"] == len(".eve.zoë.")
    assert stats["splits"]["test"]["oov"] == 0
    assert tok.decode(load_ids(tmp_path / "t", "val").tolist()) == ".eve.[UNK][UNK][UNK]."


def test_oov_unk_does_not_grow_the_vocab_when_not_needed():
    assert train_tokenizer(char("names", oov="unk"), corpus("names"), "lines").get_vocab_size() == 27


# ----------------------------------------------------------------------------------------------
# byte-level BPE round-trips anything


@functools.cache
def small_bpe():
    return train_tokenizer(bpe(400), {"train": [corpus("oz")["train"][0][:30_000]]}, "text")


def test_bpe_tricky_strings():
    tok = small_bpe()
    for s in [
        "",
        " ",
        "  leading",
        "trailing  ",
        "\n\n\n",
        "a\r\nb\tc",
        "“curly” ‘quotes’ — dash",
        "naïve e\u0301",
        "😀👩‍👩‍👧 中文 العربية",
        "\x00\x01\x7f\u200b\ufeff",
        "[UNK] <|endoftext|> <s>",
    ]:
        ids = encode_split(tok, [s], "text")
        assert tok.decode(ids.tolist()) == s, repr(s)


@settings(deadline=None, max_examples=100)
@given(st.text())
def test_bpe_round_trips_any_unicode(s):
    tok = small_bpe()
    assert tok.decode(encode_split(tok, [s], "text").tolist()) == s


@settings(deadline=None, max_examples=50)
@given(st.lists(st.text(st.characters(codec="utf-8", exclude_characters=".")), max_size=5))
def test_bpe_lines_round_trip(lines):
    tok = small_bpe()
    assert tok.decode(encode_split(tok, lines, "lines").tolist()) == split_text(lines, "lines")


# ----------------------------------------------------------------------------------------------
# the stage


def run_stage(*args: str) -> subprocess.CompletedProcess:
    import tempfile

    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tracking"] = {"enabled": False}  # unit tests never log to the project's MLflow store
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return run([sys.executable, "-m", "stages.tokenize", *args, "--params", str(path)], cwd=ROOT, timeout=120)


def save_dataset(splits: dict[str, list[str]], data_dir: Path) -> None:
    """What the fetch stage writes (data/<corpus>/dataset), minus stats.json."""
    import datasets

    datasets.disable_progress_bars()
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()})
    dd.save_to_disk(str(data_dir / "dataset"))


def test_stage(tmp_path):
    names = {"train": ["emma", "olivia", "ava", "isabella"], "val": ["mia", "leo"], "test": ["amelia"]}
    data = tmp_path / "data" / "names"
    save_dataset(names, data)
    out = tmp_path / "tokenizers" / "names-char"

    r = run_stage("names-char", "--data", str(data), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "names-char" in r.stdout and "vocab 10" in r.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kind"] == "char" and stats["format"] == "lines" and stats["boundary_id"] == 0
    assert load_ids(out, "val").tolist() == encode_split(load_tokenizer(out), names["val"], "lines").tolist()
    check_round_trip(out, names, "lines")

    r = run_stage("no-such", "--data", str(data), "--out", str(out))
    assert r.returncode == 2 and "names-char" in r.stderr and "shakespeare-bpe512" in r.stderr

    names["val"].append("zoë")
    save_dataset(names, tmp_path / "bad")
    r = run_stage("names-char", "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "bad-out"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "'z'" in r.stderr and "'ë'" in r.stderr and "tokenizers.names-char.oov: unk" in r.stderr
    assert not (tmp_path / "bad-out").exists()
