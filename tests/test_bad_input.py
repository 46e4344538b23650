"""Bad input gets a clear error and nothing is lost.

Each test really does the bad thing (an empty or non-UTF-8 corpus, a split shorter than one window, a
full disk, a read-only folder, two `dvc repro` at once) and checks that the error names the problem and
the fix, that no output is left half-written (the previous output, if any, is intact) and that no
temporary file survives. Covered elsewhere, not repeated here: a corpus with the wrong sha256
(test_fetch.py), val characters missing from a char vocabulary (test_tokenizer.py), BPE vocab_size
below 257 and train.batch_size 0 (test_config.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lm.atomic import OutputError, atomic_dir, atomic_write_text, write_json
from lm.batches import BatchError, for_model
from lm.config import CorpusConfig, SplitConfig, TokenizerConfig
from lm.data import DataError, fetch, prepare_corpus
from lm.families import BigramNNConfig, GPTConfig, MLPConfig, SingleHeadConfig, WaveNetConfig
from lm.tokenizer import load_ids, load_stats, tokenize_corpus

from helpers import copy_project, dvc_env, kill_group, run, sh
from tiny import FIXTURE_SHA256, tiny_params, with_runs

ROOT = Path(__file__).resolve().parents[1]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones included: temp files are hidden) → its bytes (None: a folder)."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def corpus_cfg(raw: bytes, fmt: str = "text", port: int = 9, **clean) -> CorpusConfig:
    """A corpus whose pinned file is `raw` (so the checksum passes); the URL is a closed loopback port."""
    return CorpusConfig(
        url=f"http://127.0.0.1:{port}/bad.txt",
        sha256=hashlib.sha256(raw).hexdigest(),
        filename="bad.txt",
        format=fmt,
        split=SplitConfig(train=0.8, val=0.2),
        clean=clean,
    )


def prepare_bad(tmp_path: Path, raw: bytes, fmt: str = "text", **clean) -> tuple[str, Path]:
    """prepare_corpus on a mirror holding `raw`; it must fail. Returns (message, mirror file)."""
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "bad.txt").write_bytes(raw)
    with pytest.raises(DataError) as e:
        prepare_corpus(
            "toy", corpus_cfg(raw, fmt, **clean), 1337, tmp_path / "data" / "toy", tmp_path / "mirror", retries=0
        )
    # Nothing written: no output folder, no scratch folder, no temp file; the mirror untouched.
    assert snapshot(tmp_path / "data") == {}
    assert snapshot(tmp_path / "mirror") == {"bad.txt": raw}
    return str(e.value), tmp_path / "mirror" / "bad.txt"


# ----------------------------------------------------------------------------------------------
# corpora


@pytest.mark.parametrize(
    "raw, fmt, clean",
    [
        (b"", "text", {}),  # an empty file
        (b"\xef\xbb\xbf \r\n\t\n", "text", {"strip": True}),  # only a BOM and whitespace
        (b"*** START OF THE BOOK ***\r\n*** END OF THE BOOK ***\r\n", "text", {}),  # only Gutenberg boilerplate
    ],
    ids=["zero-bytes", "whitespace", "boilerplate"],
)
def test_empty_corpus_names_the_file_and_the_fix(tmp_path, raw, fmt, clean):
    msg, src = prepare_bad(tmp_path, raw, fmt, **clean)
    assert msg.startswith(f"{src}: text is empty after cleaning ({len(raw)} bytes before cleaning)")
    assert "corpora.toy.url" in msg and "corpora.toy.clean" in msg


def test_lines_corpus_without_a_line_names_the_file(tmp_path):
    msg, src = prepare_bad(tmp_path, b"\n\n\n", "lines")
    assert msg.startswith(f"{src}: no non-empty lines to split")
    assert "corpora.toy.url" in msg


def test_non_utf8_corpus_names_the_file_and_the_byte_offset(tmp_path):
    raw = "Caf\u00e9 cr\u00e8me\n".encode("latin-1")  # é is 0xe9: a UTF-8 lead byte without continuation
    msg, src = prepare_bad(tmp_path, raw)
    assert msg.startswith(f"{src}: text is not UTF-8: invalid continuation byte at byte offset 3 (b'\\xe9 cr')")
    assert "must be UTF-8" in msg and "re-encode" in msg and "corpora.toy.url" in msg


def test_fetch_stage_reports_a_bad_corpus_in_one_line(tmp_path):
    """The stage itself: exit 1, one line naming the corpus, the file, the byte offset; no output folder."""
    raw = b"ok so far \xff\xfe"
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "bad.txt").write_bytes(raw)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["corpora"] = {"toy": corpus_cfg(raw).model_dump(mode="json")}
    params["tokenizers"], params["tracking"] = {}, {"enabled": False}
    params["report"]["per_token"], params["baselines"] = [], {}  # (they name corpora)
    with_runs(params, {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "data" / "toy"
    r = run(
        [sys.executable, "-m", "stages.fetch", "toy", "--out", str(out), "--params", str(tmp_path / "params.yaml")],
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "LM_DATA_MIRROR": str(tmp_path / "mirror")},
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr.startswith(f"error: toy: {tmp_path / 'mirror' / 'bad.txt'}: text is not UTF-8")
        and "byte offset 10" in r.stderr
    )
    assert not (tmp_path / "data").exists() or snapshot(tmp_path / "data") == {}


# ----------------------------------------------------------------------------------------------
# splits shorter than one window


def tokenized(tmp_path: Path, train: str, val: str) -> Path:
    """A char-tokenized text corpus on disk (what the tokenize stage writes)."""
    out = tmp_path / "tok"
    tokenize_corpus(
        TokenizerConfig(corpus="c", kind="char"), {"train": [train], "val": [val]}, "text", out, name="c-char"
    )
    return out


def batches(tok: Path, split: str, model):
    return for_model(model, load_ids(tok, split), "text", load_stats(tok)["boundary_id"])


def test_train_split_shorter_than_one_window(tmp_path):
    tok = tokenized(tmp_path, "to be or not", "to be")  # 12 train tokens
    with pytest.raises(BatchError) as e:
        batches(tok, "train", SingleHeadConfig(family="single_head", block_size=16))
    msg = str(e.value)
    assert msg.startswith(f"train split ({tok.resolve() / 'train.bin'}) has 12 tokens, fewer than block_size + 1 = 17")
    assert "set model.block_size <= 11" in msg and "more text" in msg


def test_val_split_shorter_than_one_window(tmp_path):
    tok = tokenized(tmp_path, "to be or not to be, that is the question", "the bias")  # 8 val tokens
    assert batches(tok, "train", GPTConfig(family="gpt", block_size=16, n_embd=8, n_head=2))  # train is long enough
    with pytest.raises(BatchError) as e:
        batches(tok, "val", GPTConfig(family="gpt", block_size=16, n_embd=8, n_head=2))
    msg = str(e.value)
    assert msg.startswith(f"val split ({tok.resolve() / 'val.bin'}) has 8 tokens, fewer than block_size + 1 = 17")
    assert "set model.block_size <= 7" in msg and "a larger val fraction" in msg
    # The same split with a split name given by the caller, and one with a single token (no block_size fits).
    with pytest.raises(
        BatchError, match=r"^val split has 1 token, fewer than block_size \+ 1 = 4 .*: give the split more text"
    ):
        for_model(MLPConfig(family="mlp", block_size=3), np.array([5]), "text", None, split="val")


def test_fixed_context_families_fit_their_window_to_a_short_split(tmp_path):
    """Bigrams and MLPs read long windows internally (TEXT_WINDOW); a short split shrinks the window rather
    than failing with advice about a block_size the user never set."""
    from lm.models import build_model

    tok = tokenized(tmp_path, "to be or not to be, that is the question", "the bias")
    vocab = load_stats(tok)["vocab_size"]
    for model in [
        BigramNNConfig(family="bigram_nn"),
        MLPConfig(family="mlp", block_size=3),
        WaveNetConfig(family="wavenet", block_size=4, n_embd=4, n_hidden=8),
    ]:
        b = batches(tok, "val", model)
        scored = [int(t) for _, y in b.iterate(4) for t in y.flatten().tolist() if t != -1]
        assert scored == load_ids(tok, "val")[1:].tolist()  # every target once, as with long splits
        x, y = b.sample(np.random.default_rng(0), 3)
        assert x.shape == y.shape == (3, 7)
        _, loss = build_model(model, vocab)(x, y)  # the model takes the shorter window
        assert loss.isfinite()
    with pytest.raises(BatchError, match=r"has 8 tokens, fewer than block_size \+ 1 = 9 .*set model.block_size <= 7"):
        batches(tok, "val", MLPConfig(family="mlp", block_size=8))


# ----------------------------------------------------------------------------------------------
# full disk, read-only folder: atomic outputs


def failing(exc: OSError, real, when=lambda *a, **k: True):
    """A stand-in for `real` that raises `exc` when `when(*args)` holds, else calls `real`."""

    def f(*args, **kwargs):
        if when(*args, **kwargs):
            raise exc
        return real(*args, **kwargs)

    return f


def publishing(src, dst, *a, **k) -> bool:
    """os.replace of a finished temp output onto its destination (not the moving aside of the old one)."""
    return Path(src).name.endswith(".tmp")


def fill_dir(tmp: Path) -> None:
    (tmp / "a.txt").write_text("new a")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.bin").write_bytes(b"new b")


@pytest.mark.parametrize(
    "target, exc, when",
    [
        ("os.fsync", ENOSPC, None),  # the disk fills up while the output is made durable
        ("os.replace", EROFS, publishing),  # the old output was moved aside, then the rename onto it fails
        ("os.replace", EROFS, None),  # the old output cannot even be moved aside
        ("tempfile.mkdtemp", EROFS, None),  # read-only folder: not even the temp folder can be made
    ],
    ids=["fsync-enospc", "publish-erofs", "move-aside-erofs", "mkdtemp-erofs"],
)
def test_atomic_dir_failure_keeps_the_previous_output(tmp_path, monkeypatch, target, exc, when):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    before = snapshot(tmp_path)
    module, name = target.split(".")
    real = getattr({"os": os, "tempfile": tempfile}[module], name)
    monkeypatch.setattr(f"{module}.{name}", failing(exc, real, when or (lambda *a, **k: True)))
    with pytest.raises(OutputError) as e:
        with atomic_dir(out) as tmp:
            fill_dir(tmp)
    monkeypatch.undo()
    assert isinstance(e.value, OSError) and e.value.errno == exc.errno
    assert str(e.value).startswith(f"cannot write {out}: {exc.strerror}; ")
    assert ("free disk space" if exc.errno == errno.ENOSPC else f"make {tmp_path} writable") in str(e.value)
    assert "previous" in str(e.value)
    assert snapshot(tmp_path) == before  # the old output, intact; no .tmp or .old folder left


def test_atomic_dir_write_inside_fails(tmp_path):
    """The body's own write fails (disk full while writing a file into the temp folder): same guarantees,
    and the message names the output, not the temp folder."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError) as e:
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "b.txt"))
    assert str(e.value).startswith(f"cannot write {out}: No space left on device; free disk space")
    assert ".tmp" not in str(e.value)
    assert snapshot(tmp_path) == before


def test_atomic_dir_replaces_a_file_and_an_empty_dir(tmp_path):
    (tmp_path / "f").write_text("a file")
    (tmp_path / "d").mkdir()
    for name in ("f", "d"):
        with atomic_dir(tmp_path / name) as tmp:
            fill_dir(tmp)
    assert snapshot(tmp_path) == {
        f"{n}{p}": v
        for n in ("f", "d")
        for p, v in {"": None, "/a.txt": b"new a", "/sub": None, "/sub/b.bin": b"new b"}.items()
    }


@pytest.mark.parametrize(
    "write", [lambda p: atomic_write_text(p, "new text"), lambda p: write_json(p, {"new": 1})], ids=["text", "json"]
)
@pytest.mark.parametrize(
    "target, exc",
    [("os.fsync", ENOSPC), ("os.replace", EROFS), ("tempfile.mkstemp", EROFS)],
    ids=["fsync-enospc", "replace-erofs", "mkstemp-erofs"],
)
def test_atomic_write_failure_keeps_the_previous_file(tmp_path, monkeypatch, write, target, exc):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    module, name = target.split(".")
    monkeypatch.setattr(f"{module}.{name}", failing(exc, getattr({"os": os, "tempfile": tempfile}[module], name)))
    with pytest.raises(OutputError) as e:
        write(path)
    monkeypatch.undo()
    assert e.value.errno == exc.errno and str(e.value).startswith(f"cannot write {path}: {exc.strerror}; ")
    assert snapshot(tmp_path) == {"metrics.json": b"old"}  # no .metrics.json.*.tmp left
    write(path)  # and once the disk is fine again, it works
    assert path.read_text() != "old" and snapshot(tmp_path).keys() == {"metrics.json"}


def test_tokenize_disk_full_keeps_the_previous_tokenizer(tmp_path, monkeypatch):
    cfg = TokenizerConfig(corpus="c", kind="char")
    out = tmp_path / "tokenizers" / "c-char"
    tokenize_corpus(cfg, {"train": ["abc abc"], "val": ["cab"]}, "text", out)
    before = snapshot(tmp_path)
    monkeypatch.setattr("os.fsync", failing(ENOSPC, os.fsync))
    with pytest.raises(
        OutputError, match=f"^cannot write {re.escape(str(out))}: No space left on device; free disk space"
    ):
        tokenize_corpus(cfg, {"train": ["abcd abcd"], "val": ["dcba"]}, "text", out)
    assert snapshot(tmp_path) == before


def test_fetch_disk_full_keeps_the_previous_corpus(mirror, unused_port, tmp_path, monkeypatch):
    cfg = CorpusConfig(
        url=f"http://127.0.0.1:{unused_port}/names.txt",
        filename="names.txt",
        format="lines",
        sha256=FIXTURE_SHA256["names.txt"],
        split=SplitConfig(train=0.8, val=0.1, test=0.1),
    )
    out = tmp_path / "data" / "names"
    prepare_corpus("names", cfg, 1337, out, mirror, retries=0)
    before = snapshot(tmp_path)
    read_only = (
        f"^cannot write {re.escape(str(out))}: Read-only file system; make {re.escape(str(out.parent))} writable"
    )

    # 1. the disk fills while the raw file is copied from the mirror
    monkeypatch.setattr("os.fsync", failing(ENOSPC, os.fsync))
    with pytest.raises(
        DataError, match=r"cannot copy mirror file .*names.txt.*No space left on device; check permissions and free"
    ):
        prepare_corpus("names", cfg, 1337, out, mirror, retries=0)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()

    # 2. the dataset is complete but the folder is read-only when it is renamed into place
    monkeypatch.setattr("os.replace", failing(EROFS, os.replace, publishing))
    with pytest.raises(OutputError, match=read_only):
        prepare_corpus("names", cfg, 1337, out, mirror, retries=0)
    assert snapshot(tmp_path) == before
    monkeypatch.undo()

    # 3. read-only from the start: not even the scratch folder for the download can be made
    monkeypatch.setattr("tempfile.mkdtemp", failing(EROFS, tempfile.mkdtemp))
    with pytest.raises(OutputError, match=read_only):
        prepare_corpus("names", cfg, 1337, out, mirror, retries=0)
    assert snapshot(tmp_path) == before


def test_fetch_into_a_read_only_folder(http_server, tmp_path, monkeypatch):
    body = b"emma\n" * 10
    dest = tmp_path / "d" / "f.txt"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    monkeypatch.setattr("tempfile.mkstemp", failing(EROFS, tempfile.mkstemp))
    with pytest.raises(DataError, match=r"cannot write .*f.txt: \[Errno 30\] Read-only file system; check permissions"):
        fetch(http_server.serve("/f.txt", body), hashlib.sha256(body).hexdigest(), dest, filename="f.txt", retries=0)
    assert snapshot(dest.parent) == {"f.txt": b"old"}


def run_stage_in_process(module, argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) of a stage in this process (so a monkeypatch applies); returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    return e.value.code, capsys.readouterr().err


def test_stages_report_a_full_disk_in_one_line(mirror, tmp_path, monkeypatch, capsys):
    import stages.fetch
    import stages.tokenize

    params = tiny_params()
    params["tracking"] = {"enabled": False}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("LM_DATA_MIRROR", str(mirror))
    data, tok = tmp_path / "data" / "names", tmp_path / "tokenizers" / "names-char"
    stages.fetch.main(["names", "--out", str(data), "--params", str(tmp_path / "params.yaml")])
    stages.tokenize.main(
        ["names-char", "--data", str(data), "--out", str(tok), "--params", str(tmp_path / "params.yaml")]
    )
    capsys.readouterr()
    before = snapshot(tmp_path)

    monkeypatch.setattr("os.replace", failing(ENOSPC, os.replace, publishing))
    for module, argv, stage in [
        (stages.fetch, ["names", "--out", str(data)], "names"),
        (stages.tokenize, ["names-char", "--data", str(data), "--out", str(tok)], "names-char"),
    ]:
        code, err = run_stage_in_process(module, [*argv, "--params", str(tmp_path / "params.yaml")], capsys)
        out = Path(argv[-1])
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: {stage}: cannot write {out}: No space left on device; free disk space")
    assert snapshot(tmp_path) == before


def test_outputs_get_the_modes_of_plain_files_and_folders(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp, which create private (0600/0700) files: outputs get the modes
    a plain open() or mkdir() would give under the umask instead (0644/0755 with the usual 022)."""
    import stat

    import torch
    from safetensors.torch import save_file

    from lm.atomic import DIR_MODE, FILE_MODE

    mask = os.umask(0)
    os.umask(mask)
    assert (FILE_MODE, DIR_MODE) == (0o666 & ~mask, 0o777 & ~mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "b.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # its own temp file: 0600
        (tmp / "sub").mkdir(mode=0o700)
    write_json(tmp_path / "m.json", {})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {
        "a.txt": FILE_MODE,
        "d": DIR_MODE,
        "b.json": FILE_MODE,
        "model.safetensors": FILE_MODE,
        "sub": DIR_MODE,
        "m.json": FILE_MODE,
        "plain.txt": FILE_MODE,
    }


def test_make_repro_checks_params_before_dvc_resolves_the_dag(tmp_path):
    """A run naming a missing tokenizer: DVC alone would only say that tokenizers/<name> does not exist;
    `make repro` (and `make verify`) validate params.yaml first, which names the key and the choices."""
    for f in ("Makefile", "requirements.lock", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)
    for target in ("repro", "verify"):
        r = subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True, text=True)
        lines = r.stdout.splitlines()
        check = next(i for i, line in enumerate(lines) if "lm check-params params.yaml" in line)
        assert check < next(i for i, line in enumerate(lines) if "dvc repro" in line), (target, r.stdout)

    params = tiny_params()
    params["runs"]["names-mlp"]["tokenizer"] = "names-chr"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "lm.cli", "check-params", "params.yaml"], cwd=tmp_path,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    assert "runs.names-mlp.tokenizer: got 'names-chr'; must be one of ['names-char', " in r.stderr


# ----------------------------------------------------------------------------------------------
# a full disk while training saves

SAFETENSORS_ENOSPC = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)
"""What safetensors raises (a SafetensorError, not an OSError) when the disk fills during a write."""


def _tiny_run(checkpoint_interval: int):
    from lm.config import RunConfig

    model = {"family": "gpt", "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}
    train = {"max_steps": 30, "batch_size": 4, "eval_interval": 10, "eval_batches": 1}
    return RunConfig(tokenizer="c-char", model=model, train={**train, "checkpoint_interval": checkpoint_interval})


def _full_disk_on(monkeypatch, part: str) -> None:
    """Every safetensors write whose path contains `part` fails as a full disk does."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        if part in str(filename):
            raise SafetensorError(SAFETENSORS_ENOSPC)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_model_past_the_machine_s_memory_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    """n_embd 12000 (3.5 B parameters) passed check-params and allocated until the kernel killed it; n_embd
    100000 failed after 10 s in the allocator. check-params and training refuse up front, naming the parameter
    count, the bytes training needs and the memory available."""
    from lm import memory
    from lm.config import RunConfig
    from lm.train_run import train_run

    params = tiny_params()
    big = next(n for n, r in params["runs"].items() if r["model"]["family"] == "gpt")
    params["runs"][big]["model"]["n_embd"] = 100_000  # past any machine: ~4e11 parameters
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    t0 = time.perf_counter()
    r = run([sys.executable, "-m", "lm.cli", "check-params", str(tmp_path / "p.yaml")], timeout=120)
    assert r.returncode == 2 and time.perf_counter() - t0 < 60, r.stderr
    line = next(x for x in r.stderr.splitlines() if f"runs.{big}:" in x)
    assert re.search(r"the model has [\d,]+ parameters; training needs about [\d.]+ GB \(weights, gradients", line)
    assert "this machine has" in line and "make the model smaller" in line

    tok = tokenized(tmp_path, "to be or not to be, that is the question " * 20, "to see the tea " * 10)
    run_cfg = _tiny_run(0).model_dump()
    run_cfg["model"]["n_embd"] = 12_000
    monkeypatch.setattr(memory, "available", lambda: 24 * 2**30)  # the 24 GiB machine of the report
    built = []
    monkeypatch.setattr("lm.train_run.build_model", lambda *a: built.append(a))
    with pytest.raises(memory.TooBig, match=r"training needs about \d+\.\d GB .* 25\.8 GB available"):
        train_run("big", RunConfig.model_validate(run_cfg), tok, tmp_path / "models" / "big", tmp_path / "c.csv")
    assert not built and not (tmp_path / "models" / "big").exists()
    monkeypatch.setenv("LM_MEMORY_CHECK", "off")  # the escape hatch the message names
    memory.check_training(RunConfig.model_validate(run_cfg), 60, free=1)


def test_full_disk_at_the_end_keeps_the_trained_model(tmp_path, monkeypatch, capsys, one_thread):
    """checkpoint_interval 0 (no periodic saves): the outputs cannot be written, yet the trained model is kept
    and a re-run only writes them, equal to a run that never failed."""
    from lm.train_run import NotWritten, train_run

    tok = tokenized(tmp_path, "to be or not to be, that is the question " * 20, "to see the tea " * 10)
    run, models = _tiny_run(0), tmp_path / "models"
    train_run("ref", run, tok, models / "ref", tmp_path / "ref.csv", progress=False)

    _full_disk_on(monkeypatch, "/.m.")  # the outputs' temp folder (.m.<random>.tmp), not the state
    monkeypatch.setattr("lm.train_run.WRITE_RETRY_S", 0.0)  # give up at once (the retry has its own test)
    with pytest.raises(NotWritten) as e:
        train_run("m", run, tok, models / "m", tmp_path / "m.csv", progress=False)
    state = models / ".m.resume"
    assert f"cannot write {models / 'm'}: No space left on device; free disk space and rerun" in str(e.value)
    assert f"The trained model is kept in {state} (step 30): run the stage again" in str(e.value)
    assert json.loads((state / "state.json").read_text())["step"] == 30
    assert sorted(p.name for p in models.iterdir()) == [".m.lock", ".m.resume", ".ref.lock", "ref"]  # no temp files

    monkeypatch.undo()
    capsys.readouterr()
    train_run("m", run, tok, models / "m", tmp_path / "m.csv", progress=False)
    assert f"resuming from {state} at step 30/30" in capsys.readouterr().err
    assert (models / "m" / "model.safetensors").read_bytes() == (models / "ref" / "model.safetensors").read_bytes()
    assert not state.exists()


def test_full_disk_at_the_final_save_names_the_step_really_kept(tmp_path, monkeypatch, capsys, one_thread):
    """The disk fills after the step-10 save: the saves at 20 and 30 and the outputs fail. The message used to
    say "kept in .m.resume (step 30)" while the state there was step 10: it names step 10, says the final save
    failed, and the rerun resumes there and ends bit-identical to a run that never failed."""
    import safetensors.torch
    from safetensors import SafetensorError

    from lm.train_run import NotWritten, train_run

    tok = tokenized(tmp_path, "to be or not to be, that is the question " * 20, "to see the tea " * 10)
    run, models = _tiny_run(10), tmp_path / "models"
    train_run("ref", run, tok, models / "ref", tmp_path / "ref.csv", progress=False)
    real, saves = safetensors.torch.save_file, []

    def save_file(tensors, filename, *a, **k):
        if ".m." in str(filename):  # run m's state (..m.resume.<random>.tmp) and outputs (.m.<random>.tmp)
            saves.append(filename)
            if len(saves) > 1:  # the first state save (step 10) fits, then the disk is full
                raise SafetensorError(SAFETENSORS_ENOSPC)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr("lm.train_run.WRITE_RETRY_S", 0.0)
    with pytest.raises(NotWritten) as e:
        train_run("m", run, tok, models / "m", tmp_path / "m.csv", progress=False)
    state = models / ".m.resume"
    assert f"Saving the final state failed too: {state} holds step 10 of 30" in str(e.value)
    assert "it resumes at step 10 and trains steps 11-30 again" in str(e.value) and "(step 30)" not in str(e.value)
    monkeypatch.undo()
    capsys.readouterr()
    train_run("m", run, tok, models / "m", tmp_path / "m.csv", progress=False)
    assert f"resuming from {state} at step 10/30" in capsys.readouterr().err
    assert (models / "m" / "model.safetensors").read_bytes() == (models / "ref" / "model.safetensors").read_bytes()


def test_full_disk_at_the_end_is_retried_with_the_model_held_in_memory(tmp_path, monkeypatch, capsys, one_thread):
    """The outputs cannot be written at first: one warning says what to free, the model is held in memory and
    the write retried; once space is free the outputs appear, equal to a run that never failed."""
    import safetensors.torch
    from safetensors import SafetensorError

    from lm.train_run import train_run

    tok = tokenized(tmp_path, "to be or not to be, that is the question " * 20, "to see the tea " * 10)
    run, models = _tiny_run(0), tmp_path / "models"
    train_run("ref", run, tok, models / "ref", tmp_path / "ref.csv", progress=False)
    real, failures = safetensors.torch.save_file, []

    def save_file(tensors, filename, *a, **k):
        if "/.m." in str(filename) and len(failures) < 3:  # three attempts fail, then space is freed
            failures.append(filename)
            raise SafetensorError(SAFETENSORS_ENOSPC)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr("lm.train_run.WRITE_RETRY_EVERY_S", 0.01)
    capsys.readouterr()
    train_run("m", run, tok, models / "m", tmp_path / "m.csv", progress=False)
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "the trained model (step 30) is held in memory: free at least" in warnings[0]
    assert f"MB in {models}; retrying every" in warnings[0] and len(failures) == 3
    assert (models / "m" / "model.safetensors").read_bytes() == (models / "ref" / "model.safetensors").read_bytes()
    assert not (models / ".m.resume").exists()


def test_full_disk_during_a_periodic_save_is_a_warning(tmp_path, monkeypatch, capsys, one_thread):
    """A training state that cannot be saved does not stop training: one warning per failed save, naming the
    path and the fix; the outputs are written."""
    from lm.train_run import train_run

    tok = tokenized(tmp_path, "to be or not to be, that is the question " * 20, "to see the tea " * 10)
    _full_disk_on(monkeypatch, ".resume")
    train_run("m", _tiny_run(10), tok, tmp_path / "models" / "m", tmp_path / "m.csv", progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    state = tmp_path / "models" / ".m.resume"
    assert warnings[0] == (
        f"warning: cannot write {state}: No space left on device; free disk space and rerun (the previous "
        f".m.resume, if any, is unchanged); training goes on, but a crash now restarts from scratch"
    )
    assert len(warnings) == 3  # steps 10, 20 and the final save
    assert (tmp_path / "models" / "m" / "model.safetensors").is_file() and not state.exists()


# ----------------------------------------------------------------------------------------------
# two `dvc repro` at once


@pytest.mark.slow
def test_two_repros_at_once_the_second_fails_on_the_lock(tmp_path, repo_root, mirror):
    """A second repro started while the first one's stage runs fails with DVC's lock error, runs nothing
    and touches nothing; the first then completes normally.

    DVC 3 releases its repository lock (.dvc/tmp/lock) while a stage's command runs and keeps the
    stage's outputs write-locked in .dvc/tmp/rwlock instead (dvc/stage/run.py: unlocked_repo(cmd_run)),
    so the second one fails on the rwlock, naming the first one's PID."""
    params = tiny_params()
    params["tracking"] = {"enabled": False}  # no MLflow: seconds, not tens of seconds
    project = copy_project(repo_root, tmp_path / "project", yaml.safe_dump(params, sort_keys=False))
    env = dvc_env(LM_DATA_MIRROR=str(mirror), PYTHONUNBUFFERED="1")
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(
            ["dvc", "repro", "fetch@names"],
            cwd=project,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stopped = False
    try:
        deadline = time.monotonic() + 120
        while "Running stage 'fetch@names'" not in log.read_text():  # it holds the lock and its stage has started
            assert first.poll() is None, f"the first repro ended early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the first repro never started its stage:\n{log.read_text()}"
            time.sleep(0.05)
        writers = json.loads((project / ".dvc" / "tmp" / "rwlock").read_text())["write"]
        assert [w["pid"] for p, w in writers.items() if p.endswith("data/names")] == [first.pid], writers
        # Freeze it mid-stage (its whole process group), so it certainly still runs while the second starts.
        os.killpg(first.pid, signal.SIGSTOP)
        stopped = True
        second = sh(project, "dvc", "repro", "fetch@names", check=False, env=env)
        os.killpg(first.pid, signal.SIGCONT)
        stopped = False
        out = second.stdout + second.stderr
        assert second.returncode != 0, out
        # The first holds the check stage's outputs (params.ok, code/*.txt: every stage's deps) and data/names.
        held = r"(params\.ok|code/[\w.]+\.txt|data/names)"
        busy = rf"{held}' is busy, it is being blocked by:\s+\(PID {first.pid}\): \S*dvc repro"
        assert re.search(busy, out), out
        assert ".dvc/tmp/rwlock' and try again" in out and "Traceback" not in out and "Running stage" not in out
        assert first.wait(timeout=120) == 0, log.read_text()
    finally:
        if first.poll() is None:
            if stopped:
                os.killpg(first.pid, signal.SIGCONT)
            try:
                first.wait(timeout=120)
            except subprocess.TimeoutExpired:
                kill_group(first)
                raise
    assert "Running stage 'fetch@names'" in log.read_text() and "ERROR" not in log.read_text()
    assert (project / "data" / "names" / "dataset" / "dataset_dict.json").is_file()
    assert "fetch@names" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]


@pytest.mark.parametrize(
    "make_target, dvc_target", [("repro", "report"), ("finetune", "finetune-report"), ("gguf", "gguf-report")]
)
@pytest.mark.parametrize("dvc_status", [0, 3])
def test_make_repro_defers_tracking_and_logs_the_runs_even_after_a_failed_stage(
    tmp_path, dvc_status, make_target, dvc_target
):
    """`make repro` runs the stages with LM_TRACKING=deferred (a user's LM_TRACKING wins), then stages.track, also
    when `dvc repro` failed (the finished stages' runs are logged); make fails with dvc's status. The venv's tools
    are stand-ins that record how they were called."""
    for f in ("Makefile", "requirements.lock", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    for tool, status in (("lm", 0), ("dvc", dvc_status), ("python", 0)):
        (bin_ / tool).write_text(f'#!/bin/sh\necho "{tool} $* LM_TRACKING=$LM_TRACKING" >> "$CALLS"\nexit {status}\n')
        (bin_ / tool).chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # newer than requirements.lock: no install
    for user, expected in ((None, "deferred"), ("live", "live")):
        calls = tmp_path / f"calls-{user}"
        env = {**os.environ, "CALLS": str(calls), "LM_TRACKING": user or ""}
        r = subprocess.run(["make", make_target], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == (2 if dvc_status else 0), r.stderr  # make's own status for a failed recipe
        assert calls.read_text().splitlines() == [
            "lm check-params params.yaml LM_TRACKING=" + (user or ""),
            f"dvc repro {dvc_target} LM_TRACKING={expected}",
            "python -m stages.track LM_TRACKING=" + (user or ""),
        ]
