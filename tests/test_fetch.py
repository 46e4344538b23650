"""lm.data and the fetch stage: checked downloads that never leave partial files, cleaning, splits, storage."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lm.config import CleanConfig, CorpusConfig, SplitConfig
from lm.data import DataError, clean_text, fetch, load_splits, load_stats, prepare_corpus, split_corpus, write_dataset

from helpers import Response, run
from tiny import FIXTURE_SHA256, on_fixtures

NAMES_SHA = FIXTURE_SHA256["names.txt"]
BODY = b"emma\nolivia\nava\n" * 100
BODY_SHA = hashlib.sha256(BODY).hexdigest()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def get(url: str, dest: Path, **kw) -> Path:
    kw = {"filename": dest.name, "retries": 0, "backoff": 0.0, "timeout": 5.0, **kw}
    return fetch(url, kw.pop("sha256", BODY_SHA), dest, **kw)


def fails(url: str, dest: Path, **kw) -> str:
    """Run a fetch that must fail; check nothing (not even a temp file) was left; return the message."""
    with pytest.raises(DataError) as e:
        get(url, dest, **kw)
    assert list(dest.parent.iterdir()) == [], "a failed fetch left files behind"
    return str(e.value)


# ----------------------------------------------------------------------------------------------
# fetch over HTTP


def test_download_good_file(http_server, tmp_path):
    url = http_server.serve("/good.txt", BODY)
    dest = tmp_path / "d" / "good.txt"
    assert get(url, dest) == dest
    assert dest.read_bytes() == BODY
    assert os.listdir(dest.parent) == ["good.txt"]  # the temp file was renamed, not copied


def test_sha_mismatch_names_both_hashes_and_is_not_retried(http_server, tmp_path):
    url = http_server.serve("/changed.txt", BODY + b"x")
    msg = fails(url, tmp_path / "changed.txt", retries=2, label="corpora.names")
    assert f"sha256 mismatch for {url}: expected {BODY_SHA}, got {sha(BODY + b'x')}" in msg
    assert "changed upstream or the download was corrupted: check corpora.names.sha256" in msg
    assert http_server.requests == ["/changed.txt"]  # a wrong hash is not transient: no retry


def test_truncated_body_is_retried_then_reported(http_server, tmp_path):
    url = http_server.serve("/short.txt", Response(BODY[:100], content_length=len(BODY)))
    msg = fails(url, tmp_path / "short.txt", retries=1)
    assert f"truncated download: got 100 of {len(BODY)} bytes announced by Content-Length" in msg
    assert "after 2 attempts" in msg and http_server.requests == ["/short.txt"] * 2


def test_404_is_not_retried(http_server, tmp_path):
    msg = fails(http_server.url("/missing.txt"), tmp_path / "missing.txt", retries=3, label="corpora.oz")
    assert "HTTP 404" in msg and "check corpora.oz.url" in msg
    assert http_server.requests == ["/missing.txt"]


def test_5xx_is_retried_until_success(http_server, tmp_path):
    url = http_server.serve("/flaky.txt", Response(b"busy", status=503), Response(b"", status=500), BODY)
    assert get(url, tmp_path / "flaky.txt", retries=2).read_bytes() == BODY
    assert len(http_server.requests) == 3


def test_server_down(unused_port, tmp_path):
    msg = fails(f"http://127.0.0.1:{unused_port}/x.txt", tmp_path / "x.txt", retries=1)
    assert "cannot download" in msg and "refused" in msg.lower() and "after 2 attempts" in msg
    assert "LM_DATA_MIRROR" in msg  # the fix for an offline machine


def test_failure_keeps_an_existing_file(http_server, tmp_path):
    dest = tmp_path / "f.txt"
    dest.write_bytes(b"old")
    with pytest.raises(DataError):
        get(http_server.serve("/f.txt", b"new"), dest)
    assert os.listdir(tmp_path) == ["f.txt"] and dest.read_bytes() == b"old"


# ----------------------------------------------------------------------------------------------
# fetch from a mirror


def test_mirror_is_used_without_network(mirror, unused_port, tmp_path):
    dest = get(f"http://127.0.0.1:{unused_port}/names.txt", tmp_path / "names.txt", mirror=mirror, sha256=NAMES_SHA)
    assert dest.read_bytes() == (mirror / "names.txt").read_bytes()


def test_mirror_with_wrong_hash_is_an_error_not_a_fallback(http_server, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f.txt").write_bytes(b"tampered")
    url = http_server.serve("/f.txt", BODY)  # a good download is available but must not be used
    msg = fails(url, tmp_path / "d" / "f.txt", mirror=tmp_path / "m")
    assert (
        f"sha256 mismatch for mirror file {tmp_path / 'm' / 'f.txt'}: expected {BODY_SHA}, got {sha(b'tampered')}"
        in msg
    )
    assert http_server.requests == []


def test_mirror_without_the_file_downloads_and_missing_mirror_is_an_error(http_server, tmp_path):
    (tmp_path / "m").mkdir()
    url = http_server.serve("/f.txt", BODY)
    assert get(url, tmp_path / "d" / "f.txt", mirror=tmp_path / "m").read_bytes() == BODY
    msg = fails(url, tmp_path / "e" / "f.txt", mirror=tmp_path / "nowhere")
    assert f"mirror folder {tmp_path / 'nowhere'} does not exist" in msg


def test_a_failed_download_after_the_mirror_says_the_mirror_was_checked(unused_port, tmp_path):
    (tmp_path / "m").mkdir()
    msg = fails(f"http://127.0.0.1:{unused_port}/f.txt", tmp_path / "d" / "f.txt", mirror=tmp_path / "m")
    assert msg.startswith(f"cannot download http://127.0.0.1:{unused_port}/f.txt")
    assert msg.endswith(f"; f.txt is not in the mirror folder {tmp_path / 'm'} either (LM_DATA_MIRROR)")


# ----------------------------------------------------------------------------------------------
# cleaning

CLEAN = CleanConfig()


def test_clean_wonderful_wizard(mirror):
    raw = (mirror / "wonderful_wizard_of_oz.txt").read_bytes()
    text = clean_text(raw, CLEAN)
    assert raw.startswith(b"\xef\xbb\xbf") and not text.startswith("\ufeff") and "\r" not in text
    assert text.split("\n", 1)[0] == "The Wonderful Wizard of Oz"
    assert "\u201c" in text and "\u2019" in text  # curly quotes kept
    assert text == raw.decode("utf-8")[1:]  # no CR, no Gutenberg lines: only the BOM goes


def test_clean_dorothy_strips_bom_crlf_and_gutenberg_header(mirror):
    raw = (mirror / "dorothy_and_the_wizard_in_oz.txt").read_bytes()
    text = clean_text(raw, CLEAN)
    # reference: drop the BOM, CRLF → LF, keep the lines after the START line, all else untouched
    lines = raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    assert text == "\n".join(lines[start + 1 :])
    assert "*** START" not in text and "\r" not in text and "\ufeff" not in text
    assert text.lstrip().startswith("Produced by Chris Curnow") and text.endswith("The End")


def test_clean_options():
    raw = "\ufeffhead\r\n*** START OF X ***\r\n  body\rline\r\n*** END OF X ***\r\nfooter\r\n".encode()
    assert clean_text(raw, CLEAN) == "  body\nline\n"
    assert clean_text(raw, CleanConfig(strip=True)) == "body\nline"
    assert clean_text(raw, CleanConfig(strip_gutenberg=False)).startswith("head\n*** START")
    kept = clean_text(raw, CleanConfig(strip_bom=False, normalize_newlines=False, strip_gutenberg=False))
    assert kept == raw.decode()
    assert clean_text(b"no markers\n", CLEAN) == "no markers\n"


def test_clean_errors():
    with pytest.raises(DataError, match=r"not UTF-8: invalid start byte at byte offset 5 \(b'\\xff!'\)"):
        clean_text(b"caf\xc3\xa9\xff!", CLEAN)  # é (2 bytes) is fine; 0xff is not
    with pytest.raises(DataError, match="empty after cleaning"):
        clean_text(b"\xef\xbb\xbf \r\n", CleanConfig(strip=True))


# ----------------------------------------------------------------------------------------------
# splits

S_NAMES = SplitConfig(train=0.8, val=0.1, test=0.1)
S_TEXT = SplitConfig(train=0.9, val=0.1)


@pytest.fixture(scope="module")
def names_text(mirror) -> str:
    return clean_text((mirror / "names.txt").read_bytes(), CLEAN)


def test_names_split(names_text):
    s = split_corpus(names_text, "lines", S_NAMES, seed=1337)
    assert {k: len(v) for k, v in s.items()} == {"train": 1600, "val": 200, "test": 200}
    everything = names_text.split("\n")
    assert len(everything) == 2000 and sum(map(len, s.values())) == 2000
    # disjoint as a partition of the list (names repeat, so compare multisets)
    assert Counter(s["train"]) + Counter(s["val"]) + Counter(s["test"]) == Counter(everything)
    assert split_corpus(names_text, "lines", S_NAMES, seed=1337) == s
    assert split_corpus(names_text, "lines", S_NAMES, seed=42)["train"] != s["train"]


def test_shakespeare_split_is_contiguous(mirror):
    text = clean_text((mirror / "tinyshakespeare.txt").read_bytes(), CLEAN)
    s = split_corpus(text, "text", S_TEXT, seed=0)
    assert list(s) == ["train", "val"] and all(len(v) == 1 for v in s.values())
    assert len(text) == 40105 and len(s["train"][0]) == int(len(text) * 0.9) == 36094
    assert s["train"][0] + s["val"][0] == text
    assert split_corpus(text, "text", S_TEXT, seed=1) == s  # the seed plays no part


def test_text_split_with_test_and_small_corpora():
    s = split_corpus("abcdefghij", "text", SplitConfig(train=0.7, val=0.2, test=0.1), seed=0)
    assert s == {"train": ["abcdefg"], "val": ["hi"], "test": ["j"]}  # 10 * (0.7 + 0.2) → 9, not 8
    assert split_corpus("\na\n\nb\n", "lines", SplitConfig(train=0.5, val=0.5), seed=0).keys() == {"train", "val"}
    with pytest.raises(DataError, match=r"split 'val' is empty: 3 lines"):
        split_corpus("a\nb\nc", "lines", S_NAMES, seed=0)


# ----------------------------------------------------------------------------------------------
# storage


def test_write_and_load_roundtrip(tmp_path):
    splits = {"train": ["ab", "c\u00e9"], "val": ["x"], "test": ["yy"]}
    out = tmp_path / "data" / "toy"
    stats = write_dataset(splits, out, meta={"corpus": "toy"})
    assert load_splits(out) == splits
    assert load_stats(out) == stats == json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["corpus"] == "toy"
    assert stats["splits"]["train"] == {
        "examples": 2,
        "characters": 4,
        "lines": 2,
        "distinct_characters": 4,
        "alphabet": "abc\u00e9",
    }
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_dataset(splits, out, meta={"corpus": "toy"})  # replaces the folder; same input → same bytes
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    assert os.listdir(out.parent) == ["toy"]  # no temp or old folders left
    with pytest.raises(DataError, match="run the fetch stage"):
        load_splits(tmp_path / "nothing")


def test_prepare_corpus_oz(mirror, unused_port, tmp_path):
    cfg = CorpusConfig(
        url=f"http://127.0.0.1:{unused_port}/oz.txt",
        filename="wonderful_wizard_of_oz.txt",
        sha256=FIXTURE_SHA256["wonderful_wizard_of_oz.txt"],
        format="text",
        split=S_TEXT,
    )
    stats = prepare_corpus("oz", cfg, 1337, tmp_path / "oz", mirror)
    s = load_splits(tmp_path / "oz")
    assert s["train"][0] + s["val"][0] == clean_text((mirror / cfg.filename).read_bytes(), CLEAN)
    assert stats["cleaning"]["bom_removed"] and stats["source"]["sha256"] == cfg.sha256
    assert stats["splits"]["val"]["lines"] == s["val"][0].count("\n") + (not s["val"][0].endswith("\n"))
    assert os.listdir(tmp_path) == ["oz"]  # the raw download's scratch folder is gone


# ----------------------------------------------------------------------------------------------
# the stage, as DVC runs it


def stage(repo_root: Path, tmp_path: Path, *args: str, mirror: Path | str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "LM_DATA_MIRROR": str(mirror), "HF_HOME": str(tmp_path / "hf")}
    return run([sys.executable, "-m", "stages.fetch", *args], cwd=repo_root, env=env, timeout=120)


@pytest.fixture
def params_file(repo_root, tmp_path) -> Path:
    data = on_fixtures(yaml.safe_load((repo_root / "params.yaml").read_text()))
    data = {
        "seed": 1337,
        "corpora": {"names": data["corpora"]["names"]},
        "tokenizers": {},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_names(repo_root, mirror, tmp_path, params_file):
    out = tmp_path / "data" / "names"
    r = stage(repo_root, tmp_path, "names", "--out", str(out), "--params", str(params_file), mirror=mirror)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("names: names.txt (mirror") and "train 1,600 / val 200 / test 200" in r.stdout
    assert sorted(os.listdir(out)) == ["dataset", "stats.json"]
    assert {k: len(v) for k, v in load_splits(out).items()} == {"train": 1600, "val": 200, "test": 200}
    stats = load_stats(out)
    assert stats["source"]["sha256"] == NAMES_SHA and stats["splits"]["train"]["distinct_characters"] == 26
    assert not (tmp_path / "hf").exists()  # storing the dataset wrote no Hugging Face cache


def test_stage_errors(repo_root, tmp_path, params_file):
    out = tmp_path / "out"
    # a params problem: exit 2 naming the key, before any work
    bad = tmp_path / "bad.yaml"
    bad.write_text(params_file.read_text().replace("split:", "splt:"))
    r = stage(repo_root, tmp_path, "names", "--out", str(out), "--params", str(bad))
    assert r.returncode == 2 and "corpora.names.splt: unknown key" in r.stderr
    # an unknown corpus: exit 2 listing the known ones
    r = stage(repo_root, tmp_path, "nope", "--out", str(out), "--params", str(params_file))
    assert r.returncode == 2 and "unknown corpus 'nope'" in r.stderr and "defines: names" in r.stderr
    # a data problem: exit 1, one line naming the corpus and both hashes
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "names.txt").write_text("emma\n")
    r = stage(repo_root, tmp_path, "names", "--out", str(out), "--params", str(params_file), mirror=tmp_path / "m")
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: names: sha256 mismatch for mirror file")
    assert NAMES_SHA in r.stderr and sha(b"emma\n") in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml", "m", "params.yaml"]  # no output, no temp folders
