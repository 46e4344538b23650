"""Corpora: fetch (mirror or pinned URL, sha256-checked), clean, split, and store as a HF dataset.

``prepare_corpus`` does the whole chain for one corpus and writes ``out_dir``::

    out_dir/                     (e.g. data/names)
      stats.json                 source url + sha256, cleaning applied, per-split counts
      dataset/                   datasets.DatasetDict.save_to_disk: one split per name, column "text"
        dataset_dict.json
        train/ val/ [test/]      data-00000-of-00001.arrow, dataset_info.json, state.json

'lines' corpora (names) hold one example per row; 'text' corpora hold ONE row per split, the
whole contiguous split text. ``load_splits`` reads them back as ``{split: [str, ...]}``.

Failures raise :class:`DataError` with a message that names the problem, the file and the fix (or,
when the output cannot be written, :class:`lm.atomic.OutputError`), and never leave a partial file or
folder behind: downloads go to a temp file beside the destination and datasets to a temp folder
beside ``out_dir``; both are renamed into place only when complete.
The library never reads params, argv or environment variables: the stage passes everything in.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from lm.atomic import OutputError, atomic_dir, fsync_dir
from lm.config import CleanConfig, CorpusConfig, SplitConfig

CHUNK = 1 << 20  # bytes per read when streaming downloads and mirror copies
SPLITS = ("train", "val", "test")
USER_AGENT = "lm-ladder-fetch/0.1 (+urllib)"


class DataError(RuntimeError):
    """A corpus could not be fetched, cleaned, split or read; the message says how to fix it."""


class _Transient(Exception):
    """A download attempt failed in a way worth retrying (connection, timeout, 5xx, truncation)."""


class _Mismatch(Exception):
    """The bytes were complete but their sha256 is ``actual``, not the expected one."""

    def __init__(self, actual: str):
        super().__init__(actual)
        self.actual = actual


# ----------------------------------------------------------------------------------------------
# fetch


def fetch(
    url: str,
    sha256: str,
    dest: Path,
    *,
    mirror: Path | None = None,
    filename: str,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    label: str | None = None,
    progress: bool = False,
) -> Path:
    """Put the file with checksum ``sha256`` at ``dest``: from ``mirror/filename`` if present, else ``url``.

    A mirror file with the wrong checksum is an error, not a reason to download instead: the
    mirror is supposed to be byte-exact, so a mismatch means it (or the params) is wrong.
    Downloads retry ``retries`` times (waiting ``backoff * 2**attempt`` s) on connection errors,
    timeouts, truncated bodies and HTTP 5xx/429; other HTTP errors (404, ...) fail at once.
    ``label`` (e.g. ``"corpora.names"``) names the params keys to check in error messages;
    ``progress`` shows a tqdm bar (only on a terminal).
    """
    dest = Path(dest)
    where = label or "corpora.<name>"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {dest.parent}: {e.strerror}; check the output path and its permissions") from e

    if mirror is not None:
        mirror = Path(mirror)
        if not mirror.is_dir():
            raise DataError(
                f"mirror folder {mirror} does not exist; point the mirror (env LM_DATA_MIRROR) at a folder "
                f"holding {filename}, or leave it empty to download from {url}"
            )
        src = mirror / filename
        if src.is_file():
            try:
                with open(src, "rb") as f:
                    _write_verified(dest, iter(lambda: f.read(CHUNK), b""), sha256)
            except _Mismatch as e:
                raise DataError(
                    f"sha256 mismatch for mirror file {src}: expected {sha256}, got {e.actual}; the mirror copy "
                    f"is not the pinned file: replace it with the file from {url}, or check {where}.sha256"
                ) from None
            except OSError as e:
                raise DataError(
                    f"cannot copy mirror file {src} to {dest}: {e}; check permissions and free disk space"
                ) from e
            return dest
    try:
        return _download(url, sha256, dest, filename, where, timeout, retries, backoff, progress)
    except DataError as e:
        if mirror is None:
            raise
        raise DataError(f"{e}; {filename} is not in the mirror folder {mirror} either (LM_DATA_MIRROR)") from None


def _download(
    url: str,
    sha256: str,
    dest: Path,
    filename: str,
    where: str,
    timeout: float,
    retries: int,
    backoff: float,
    progress: bool,
) -> Path:
    """Download `url` into `dest` with retries (see :func:`fetch`)."""
    attempts = max(1, retries + 1)
    for attempt in range(attempts):
        try:
            with _open(url, timeout, where) as resp:
                length = _content_length(resp)
                _write_verified(dest, _stream(resp, length, filename, progress), sha256)
            return dest
        except _Mismatch as e:  # deterministic: retrying would download the same bytes
            raise DataError(
                f"sha256 mismatch for {url}: expected {sha256}, got {e.actual}; the file changed upstream or the "
                f"download was corrupted: check {where}.sha256 / the URL"
            ) from None
        except _Transient as e:
            if attempt + 1 == attempts:
                raise DataError(
                    f"cannot download {url}: {e} (after {attempts} attempt{'s' if attempts > 1 else ''}); check the "
                    f"network, or put {filename} in a mirror folder (env LM_DATA_MIRROR)"
                ) from None
            time.sleep(backoff * 2**attempt)
        except OSError as e:  # network errors are _Transient by now: this is the local disk
            raise DataError(f"cannot write {dest}: {e}; check permissions and free disk space") from e
    raise AssertionError("unreachable")


def _open(url: str, timeout: float, where: str) -> http.client.HTTPResponse:
    """urlopen, with every failure sorted into retryable (_Transient) or final (DataError)."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise DataError(
            f"HTTP {e.code} {e.reason} for {url}; the URL is wrong or the file is gone upstream: check {where}.url"
        ) from None
    except urllib.error.URLError as e:  # connection refused, DNS failure, TLS, timeout while connecting
        raise _Transient(str(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, malformed status lines
        raise _Transient(f"{type(e).__name__}: {e}") from None
    except ValueError as e:  # unsupported URL: the params pattern should have caught it
        raise DataError(f"cannot download {url}: {e}; check {where}.url") from None


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    try:
        return int(resp.headers["Content-Length"])
    except (TypeError, ValueError):  # absent (chunked transfer) or garbage: rely on the sha256 alone
        return None


def _stream(resp: http.client.HTTPResponse, length: int | None, name: str, progress: bool) -> Iterator[bytes]:
    """Yield the body in chunks; a connection that ends before Content-Length is a _Transient error.

    http.client's read(n) returns b"" on a premature close instead of raising, so the byte count
    has to be checked here.
    """
    got = 0
    # disable=None: tqdm shows the bar only on a terminal, so DVC logs stay clean.
    with tqdm(
        total=length, unit="B", unit_scale=True, desc=name, disable=None if progress else True, leave=False
    ) as bar:
        while True:
            try:
                chunk = resp.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise _Transient(f"connection lost after {got} bytes ({type(e).__name__}: {e})") from None
            if not chunk:
                break
            got += len(chunk)
            bar.update(len(chunk))
            yield chunk
    if length is not None and got != length:
        raise _Transient(f"truncated download: got {got} of {length} bytes announced by Content-Length")


def _write_verified(dest: Path, chunks: Iterable[bytes], sha256: str) -> None:
    """Stream ``chunks`` into a temp file beside ``dest``; if the sha256 matches, fsync and rename into place.

    The temp file lives in dest's folder so that os.replace is an atomic rename on one file system;
    on any exception (including KeyboardInterrupt) it is removed, so no partial file survives.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != sha256:
            raise _Mismatch(h.hexdigest())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


# ----------------------------------------------------------------------------------------------
# clean

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*(?:\n|$)", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF", re.MULTILINE)


def clean_text(raw: bytes, cfg: CleanConfig, *, where: str = "corpora.<name>") -> str:
    """Decode UTF-8 strictly and apply ``cfg`` (BOM, newlines, Gutenberg boilerplate, strip).

    Everything not named by ``cfg`` is kept byte for byte: curly quotes, dashes, accents, tabs.
    Non-UTF-8 input and text that is empty after cleaning raise DataError (``where``, e.g.
    ``"corpora.names"``, names the params keys to check).
    """
    return _clean(raw, cfg, where)[0]


def _clean(raw: bytes, cfg: CleanConfig, where: str = "corpora.<name>") -> tuple[str, dict[str, Any]]:
    """clean_text, plus a record of what was actually changed (stored in stats.json)."""
    try:
        text = raw.decode("utf-8")  # strict: a wrong byte is an error, never a silent U+FFFD
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise DataError(
            f"text is not UTF-8: {e.reason} at byte offset {e.start} ({bad!r}); a corpus must be UTF-8 text: "
            f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) and update {where}.sha256, or check "
            f"that {where}.url points at the plain-text file"
        ) from None
    done: dict[str, Any] = {
        "bom_removed": False,
        "newlines_normalized": 0,
        "gutenberg_header_chars": 0,
        "gutenberg_footer_chars": 0,
        "stripped_chars": 0,
    }
    if cfg.strip_bom and text.startswith("\ufeff"):
        text = text[1:]
        done["bom_removed"] = True
    if cfg.normalize_newlines:
        n_cr = text.count("\r")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        done["newlines_normalized"] = n_cr
    if cfg.strip_gutenberg:
        if m := _GUTENBERG_START.search(text):  # the header ends with the START line itself
            done["gutenberg_header_chars"] = m.end()
            text = text[m.end() :]
        if m := _GUTENBERG_END.search(text):  # the footer starts at the END line
            done["gutenberg_footer_chars"] = len(text) - m.start()
            text = text[: m.start()]
    if cfg.strip:
        stripped = text.strip()
        done["stripped_chars"] = len(text) - len(stripped)
        text = stripped
    if not text:
        raise DataError(
            f"text is empty after cleaning ({len(raw):,} bytes before cleaning); point {where}.url and "
            f"{where}.sha256 at a file with text, or relax {where}.clean"
        )
    return text, done


# ----------------------------------------------------------------------------------------------
# split


def _cut(n: int, frac: float) -> int:
    # floor, as nanoGPT's int(n * 0.9); the epsilon only undoes float error such as
    # 10 * (0.7 + 0.2) = 8.999999999999998, which would otherwise lose one item.
    return min(n, int(n * frac + 1e-9))


def split_corpus(
    text: str, fmt: Literal["lines", "text"], split: SplitConfig, seed: int, *, where: str = "corpora.<name>"
) -> dict[str, list[str]]:
    """Split cleaned text into ``{"train": [...], "val": [...], ["test": [...]]}``.

    Both formats cut at the same cumulative boundaries ``floor(n * train)`` and
    ``floor(n * (train + val))`` (test gets the rest, so the sizes always sum to n), i.e.
    Zero-to-Hero's ``n1 = int(0.8 * n); n2 = int(0.9 * n)`` and nanoGPT's ``int(n * 0.9)``:

    - 'lines': the non-empty lines (only the '\\n' separators are removed), shuffled with
      ``random.Random(seed)``, cut by count; 32,033 names → 25,626 / 3,203 / 3,204.
    - 'text': cut by characters, contiguously; each split is a list with ONE string.

    Splits with fraction 0 (only test can be) are left out; an empty split is a DataError
    (``where``, e.g. ``"corpora.names"``, names the params keys to check).
    """
    if fmt == "lines":
        items = [line for line in text.split("\n") if line]
        random.Random(seed).shuffle(items)
    elif fmt == "text":
        items = text  # a str slices like a list of characters
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'lines' or 'text'")
    n = len(items)
    if n == 0:
        raise DataError(
            f"no {'non-empty lines' if fmt == 'lines' else 'characters'} to split; point {where}.url and "
            f"{where}.sha256 at a file with text"
        )
    a = _cut(n, split.train)
    b = _cut(n, split.train + split.val) if split.test > 0 else n
    parts = {"train": items[:a], "val": items[a:b], "test": items[b:]}
    out: dict[str, list[str]] = {}
    for name in SPLITS:
        if name == "test" and split.test == 0:
            continue
        part = parts[name]
        if not part:
            raise DataError(
                f"split {name!r} is empty: {n} {'lines' if fmt == 'lines' else 'characters'} cut at "
                f"train={split.train:g} val={split.val:g} test={split.test:g}; the corpus is too small for these "
                f"fractions: change {where}.split or use a larger corpus"
            )
        out[name] = list(part) if fmt == "lines" else [part]
    return out


# ----------------------------------------------------------------------------------------------
# store


def _count_lines(s: str) -> int:
    # Lines of text: '\n'-separated, a final line without '\n' counts (str.splitlines would also
    # split on \x0b, \x1c, U+2028, ..., which the tokenizers treat as ordinary characters).
    return s.count("\n") + (0 if not s or s.endswith("\n") else 1)


def split_stats(examples: list[str]) -> dict[str, Any]:
    """Counts for one split: examples (rows), characters, lines, distinct characters and the alphabet."""
    chars = set().union(*examples) if examples else set()
    return {
        "examples": len(examples),
        "characters": sum(map(len, examples)),  # names: without the line breaks between them
        "lines": sum(map(_count_lines, examples)),  # names: one per name; text: lines of the split
        "distinct_characters": len(chars),
        "alphabet": "".join(sorted(chars)),
    }


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' per-shard progress bars for the duration, then restore the caller's setting."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def write_dataset(
    splits: Mapping[str, list[str]],
    out_dir: Path,
    *,
    meta: Mapping[str, Any] | None = None,
    labels: Mapping[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/dataset`` (a DatasetDict, column "text", and "label" where `labels` gives each split's) and
    ``out_dir/stats.json``; return the stats.

    ``meta`` (source, cleaning, ...) goes into stats.json before the per-split counts. Everything is
    written to a temp folder beside ``out_dir`` and renamed into place at the end, so readers see the
    old folder, or the complete new one, never a half-written one. The output is deterministic
    (same splits → same bytes) because datasets fingerprints in-memory tables by content.
    """
    # Imported here: `datasets` is slow to import and only needed to store/load.
    from datasets import Dataset, DatasetDict

    out_dir = Path(out_dir)
    stats: dict[str, Any] = {**(meta or {}), "splits": {k: split_stats(v) for k, v in splits.items()}}
    if labels is not None:
        for k, v in labels.items():
            stats["splits"][k]["labels"] = dict(sorted(Counter(v).items()))
    columns = {k: {"text": list(v)} for k, v in splits.items()}
    for k, v in (labels or {}).items():
        columns[k]["label"] = list(v)
    with atomic_dir(out_dir) as tmp:
        # from_dict + save_to_disk touches no cache (HF_HOME stays empty); load_dataset would.
        dd = DatasetDict({k: Dataset.from_dict(c) for k, c in columns.items()})
        with _quiet_datasets():
            dd.save_to_disk(str(tmp / "dataset"))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats


def _load_dataset(data_dir: Path):
    """``data_dir/dataset`` (written by write_dataset) as a DatasetDict, or a DataError naming the fix."""
    from datasets import load_from_disk

    path = Path(data_dir) / "dataset"
    if not (path / "dataset_dict.json").is_file():
        raise DataError(
            f"no dataset at {path}; run the fetch stage first (python -m stages.fetch CORPUS --out {data_dir})"
        )
    try:
        return load_from_disk(str(path))
    except Exception as e:  # datasets raises assorted types for damaged folders
        raise DataError(f"cannot read dataset {path}: {e}; delete {data_dir} and rerun the fetch stage") from e


def _columns(data_dir: Path, *columns: str) -> dict[str, list[list[str]]]:
    """`columns` of every split, ``{split: [[value, ...] per column]}`` in split order, from one read."""
    dd = _load_dataset(data_dir)
    out = {}
    for name in sorted(dd, key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS)):
        if missing := [c for c in columns if c not in dd[name].column_names]:
            fix = "it is not a labelled corpus" if missing == ["label"] else "rerun the fetch stage"
            raise DataError(f"dataset {Path(data_dir) / 'dataset'} split {name!r} has no {missing[0]!r} column; {fix}")
        # straight from Arrow: fast, plain list[str]
        out[name] = [dd[name].data.column(c).to_pylist() for c in columns]
    return out


def load_splits(data_dir: Path) -> dict[str, list[str]]:
    """Read ``data_dir/dataset`` (written by write_dataset) back as ``{split: [text, ...]}`` in split order."""
    return {name: text for name, (text,) in _columns(data_dir, "text").items()}


def load_labelled(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Read a labelled corpus (format 'labelled', written by write_dataset with labels) back as
    ``{split: [(label, text), ...]}`` in split order."""
    return {name: list(zip(*cols, strict=True)) for name, cols in _columns(data_dir, "label", "text").items()}


def load_stats(data_dir: Path) -> dict[str, Any]:
    """Read ``data_dir/stats.json``."""
    path = Path(data_dir) / "stats.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"no {path}; run the fetch stage first (python -m stages.fetch CORPUS --out {data_dir})"
        ) from None


# ----------------------------------------------------------------------------------------------
# the whole chain


def prepare_corpus(
    name: str,
    cfg: CorpusConfig,
    seed: int,
    out_dir: Path,
    mirror: Path | None = None,
    *,
    progress: bool = False,
    timeout: float = 30.0,
    retries: int = 3,
) -> dict[str, Any]:
    """Fetch → clean → split → write one corpus into ``out_dir``; return its stats (as in stats.json).

    The raw download is not kept: it is reproducible from the pinned URL and sha256, both recorded in
    stats.json. stats.json holds only what the content determines (no paths, times or the mirror),
    so the output is byte-identical wherever it is built.
    """
    out_dir, where = Path(out_dir), f"corpora.{name}"
    # Error messages name the file the bytes came from: the mirror copy if fetch used it, else the URL.
    source = Path(mirror) / cfg.filename if mirror is not None and (Path(mirror) / cfg.filename).is_file() else cfg.url
    # The raw file goes to a scratch folder beside out_dir: same disk, inside the project, and gone
    # afterwards even on failure.
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch_dir = tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".fetch")
    except OSError as e:
        raise OutputError(out_dir, e) from e
    with scratch_dir as scratch:
        raw_path = fetch(
            cfg.url,
            cfg.sha256,
            Path(scratch) / cfg.filename,
            mirror=mirror,
            filename=cfg.filename,
            timeout=timeout,
            retries=retries,
            label=where,
            progress=progress,
        )
        raw = raw_path.read_bytes()
    if cfg.format == "labelled":
        return _prepare_labelled(name, cfg, seed, out_dir, raw, source)
    try:
        text, cleaning = _clean(raw, cfg.clean, where)
        splits = split_corpus(text, cfg.format, cfg.split, seed, where=where)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    meta = _source_meta(name, cfg, seed, raw) | {
        "clean": cfg.clean.model_dump(),
        "cleaning": {**cleaning, "characters": len(text), "distinct_characters": len(set(text))},
    }
    return write_dataset(splits, out_dir, meta=meta)


def _source_meta(name: str, cfg: CorpusConfig, seed: int, raw: bytes) -> dict[str, Any]:
    """What stats.json says of every corpus first: its name, source, format, seed and split."""
    return {
        "corpus": name,
        "source": {"url": cfg.url, "filename": cfg.filename, "sha256": cfg.sha256, "bytes": len(raw)},
        "format": cfg.format,
        "seed": seed,
        "split": cfg.split.model_dump(),
    }


def _prepare_labelled(name: str, cfg: CorpusConfig, seed: int, out_dir: Path, raw: bytes, source) -> dict[str, Any]:
    """prepare_corpus's clean → split → write for format 'labelled' (lm/labelled.py)."""
    from lm.labelled import parse_labelled, split_labelled

    try:
        examples = parse_labelled(raw, cfg, f"corpora.{name}")
        splits = split_labelled(examples, cfg, seed)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    meta = _source_meta(name, cfg, seed, raw) | {
        "labels": cfg.labels,
        "balance": cfg.balance,
        "examples": {"all": len(examples), "by_label": dict(sorted(Counter(x for x, _ in examples).items()))},
    }
    texts = {k: [t for _, t in v] for k, v in splits.items()}
    return write_dataset(texts, out_dir, meta=meta, labels={k: [x for x, _ in v] for k, v in splits.items()})
