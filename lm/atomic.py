"""Atomic outputs: a crash, a full disk or Ctrl-C never leaves a half-written file or directory.

A write that fails (disk full, read-only folder, ...) raises :class:`OutputError`, an ``OSError``
with the original ``errno`` whose message names the output and the fix; the previous output, if
any, is left as it was and no temporary file or folder survives.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()
"""Every output is created with the modes of a plain file or folder under the process's umask (0644 / 0755 with
the usual 022): readable by others on a shared machine, as results are meant to be. The temporary files that
atomic writes go through would otherwise keep mkstemp's private 0600."""


class OutputError(OSError):
    """An output could not be written; ``path`` is the output, ``cause`` the OSError behind it.

    The previous version of the output (if any) is unchanged and no temp file is left behind.
    """

    def __init__(self, path: Path, cause: OSError):
        if isinstance(cause, OutputError):  # re-raised for an enclosing output: keep the root cause
            cause = cause.cause
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path, self.cause = Path(path), cause
        reason = cause.strerror or str(cause)
        if cause.errno in (errnos.ENOSPC, errnos.EDQUOT):
            fix = "free disk space and rerun"
        elif cause.errno in (errnos.EROFS, errnos.EACCES, errnos.EPERM):
            fix = f"make {self.path.parent} writable and rerun"
        else:
            fix = f"check free disk space and that {self.path.parent} is writable, then rerun"
        self.message = (
            f"cannot write {self.path}: {reason}; {fix} (the previous {self.path.name}, if any, is unchanged)"
        )

    def __str__(self) -> str:
        return self.message


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` in one rename, on failure it is removed.

    An OSError raised while the directory is filled or published becomes an OutputError naming `out`.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise OutputError(out, e) from e
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes it private (0700)
        yield tmp
        publish(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(out, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(src: Path, dst: Path) -> None:
    """Move a finished file or folder `src` onto `dst` in one rename (replacing the previous `dst`, which is put
    back if the rename fails): durable first, and with the modes of plain outputs (writers that go through their
    own temp file, as safetensors' save_file does, leave it private: 0600)."""
    src = Path(src)
    for p in [src, *src.rglob("*")] if src.is_dir() else [src]:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(p, DIR_MODE if p.is_dir() else FILE_MODE)
    _replace(src, Path(dst))


def _replace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, replacing an existing `dst` (os.replace cannot replace a non-empty dir).

    The old `dst` is first renamed to a placeholder beside it; if `src` then cannot be renamed into
    place, the old `dst` is renamed back, so a failure leaves `dst` exactly as it was.
    """
    old = None
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
        else:
            fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old")
            os.close(fd)
            old = Path(name)
        try:
            os.replace(dst, old)  # onto the empty placeholder (allowed: an empty dir, or a file)
        except BaseException:
            _remove(old)
            raise
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)  # put the previous output back
        raise
    fsync_dir(dst.parent)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it into place (OutputError on failure)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(path, e) from e
    try:
        os.chmod(tmp, FILE_MODE)  # mkstemp makes it private (0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(path, e) from e
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`text` as UTF-8 through :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class Busy(RuntimeError):
    """Another process holds the lock of the work this process was about to do."""


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created beside the work it guards, holding the holder's pid)
    for the duration; if another process holds it, raise Busy naming `what`, that process and the fix. The
    kernel drops the lock when the holder exits, however it exits (a stale lock file is harmless)."""
    import fcntl

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise Busy(
                f"{what} is already running in another process (pid {holder}, lock {lock}): wait for it to finish "
                f"or stop it (kill {holder}); a second one would train on the same saved state"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
