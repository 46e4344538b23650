"""Labelled corpora (format 'labelled', lm/labelled.py): the line parser, the balanced stratified split of the SMS
Spam Collection, and the fetch stage writing it."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from lm.config import CorpusConfig, StudyConfig
from lm.data import DataError, load_labelled, load_stats, prepare_corpus
from lm.labelled import parse_labelled, split_labelled

from tiny import FIXTURE_SHA256, SOURCE_CORPORA

SMS = "SMSSpamCollection"


def cfg(**kw) -> CorpusConfig:
    base = dict(
        url="https://example.invalid/sms",
        sha256="0" * 64,
        filename=SMS,
        format="labelled",
        labels=["ham", "spam"],
        split={"train": 0.7, "val": 0.1, "test": 0.2},
    )
    return CorpusConfig.model_validate(base | kw)


def test_lines_keep_tabs_inside_the_text_and_lose_crlf_and_empty_lines():
    raw = b"\xef\xbb\xbfham\tgo\tuntil jurong\r\n\r\nspam\tWIN \xc2\xa3100\r\n\nham\tok lar\r\n"
    assert parse_labelled(raw, cfg()) == [("ham", "go\tuntil jurong"), ("spam", "WIN £100"), ("ham", "ok lar")]


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"ham\tfine\nspam no tab here\n", "line 2 has no tab between its label and its text: 'spam no tab here'"),
        (b"ham\tfine\n\nhma\ttypo\n", "line 3: label 'hma' is not one of ['ham', 'spam']: fix the line or add"),
        (b"ham\tfine\nspam\t\xff\xfeoops\n", "line 2 is not UTF-8 (invalid start byte at column 6"),
        (b"ham\tfine\nspam\t  \n", "line 2 ('spam') has no text after its tab"),
        (b"\n\r\n", "no labelled lines"),
    ],
)
def test_a_bad_line_is_an_error_that_names_it(raw, message):
    with pytest.raises(DataError, match=None) as e:
        parse_labelled(raw, cfg(), "corpora.sms")
    assert message in str(e.value)


def test_the_config_asks_for_labels_and_keeps_them_to_labelled_corpora():
    with pytest.raises(ValidationError, match="needs labels"):
        cfg(labels=None)
    with pytest.raises(ValidationError, match="distinct"):
        cfg(labels=["ham", "ham"])
    with pytest.raises(ValidationError, match="belong to format 'labelled'"):
        cfg(format="lines")
    with pytest.raises(ValidationError, match="is a labelled corpus"):
        StudyConfig.model_validate(
            {"corpora": {"sms": cfg().model_dump()}, "tokenizers": {"t": {"corpus": "sms", "kind": "char"}}, "runs": {}}
        )


def test_the_sms_collection_splits_as_the_book_balanced_and_stratified():
    examples = parse_labelled((SOURCE_CORPORA / SMS).read_bytes(), cfg())
    assert len(examples) == 5574 and Counter(x for x, _ in examples) == {"ham": 4827, "spam": 747}
    splits = split_labelled(examples, cfg(balance=True), 1337)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    counts = {k: Counter(x for x, _ in v) for k, v in splits.items()}
    assert counts["test"] == {"ham": 150, "spam": 150}  # stratified: each split within one example of half and half
    assert all(abs(c["ham"] - c["spam"]) <= 1 for c in counts.values())
    assert sum(c["spam"] for c in counts.values()) == 747  # every spam message kept, ham down-sampled to 747
    seen = [e for v in splits.values() for e in v]
    assert len(set(seen)) == len(set(examples) & set(seen))  # no message in two splits (duplicates aside)
    assert split_labelled(examples, cfg(balance=True), 1337) == splits  # seeded
    assert split_labelled(examples, cfg(balance=True), 1) != splits


def test_without_balance_the_split_keeps_the_label_shares():
    examples = [("spam" if i % 5 == 0 else "ham", f"m{i}") for i in range(1000)]
    splits = split_labelled(examples, cfg(), 0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 700, "val": 100, "test": 200}
    assert {k: sum(x == "spam" for x, _ in v) for k, v in splits.items()} == {"train": 140, "val": 20, "test": 40}


def test_a_label_too_rare_to_stratify_is_an_error():
    examples = [("ham", f"m{i}") for i in range(30)] + [("spam", "only one")]
    with pytest.raises(DataError, match="with every label in every split"):
        split_labelled(examples, cfg(), 0)


def test_prepare_corpus_writes_labels_beside_the_texts(mirror, unused_port, tmp_path):
    c = cfg(url=f"http://127.0.0.1:{unused_port}/sms", sha256=FIXTURE_SHA256[SMS], balance=True)
    stats = prepare_corpus("sms", c, 1337, tmp_path / "sms", mirror)
    splits = load_labelled(tmp_path / "sms")
    assert {k: len(v) for k, v in splits.items()} == {k: s["examples"] for k, s in stats["splits"].items()}
    assert load_stats(tmp_path / "sms")["splits"]["test"]["labels"] == dict(Counter(x for x, _ in splits["test"]))
    assert stats["examples"]["by_label"]["spam"] == sum(s["labels"]["spam"] for s in stats["splits"].values())


def test_a_bad_line_writes_nothing(tmp_path):
    bad = tmp_path / "mirror"
    bad.mkdir()
    raw = b"ham\tfine\r\nspam\tok\r\nbogus\tx\r\n"
    (bad / SMS).write_bytes(raw)
    import hashlib

    c = cfg(sha256=hashlib.sha256(raw).hexdigest())
    with pytest.raises(DataError, match="line 3: label 'bogus'"):
        prepare_corpus("sms", c, 1337, tmp_path / "out" / "sms", bad)
    assert list((tmp_path / "out").iterdir()) == []
