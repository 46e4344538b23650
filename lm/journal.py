"""Deferred tracking: a stage's MLflow run written to a journal folder now, logged to the store later.

Importing MLflow and opening its store costs a stage process more than many stages' own work (docs/performance.md
has the figures). `make repro` therefore runs the stages with ``LM_TRACKING=deferred``: each stage writes
what its :class:`lm.tracking.Tracker` would have sent to ``mlflow-journal/<time>-<pid>-<stage>/`` (a JSON line per
call, with its time; the artifact files beside it, hard-linked where possible, so a later rewrite of an output
does not change them), and ``python -m stages.track`` then logs every journal in one process with
:func:`lm.tracking.replay`: the same run, with its own start, end, metric times and status. Only MLflow's system
metrics (a sampler thread) are live-only. A journal is removed once its run is in the store and kept if logging
fails, so nothing is lost to a store that is down.

A journal whose process died (kill -9) has no ``end`` line: it is logged as KILLED, ending at its last line. One
whose process is still running is left for a later replay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from lm.tracking import DatasetRef, NullTracker, TrackingError, _alive, exit_status, replay

JOURNAL_DIR = "mlflow-journal"
"""The journals' folder below the project root (git-ignored), beside mlflow.db."""
EVENTS = "events.jsonl"
"""A journal's calls, one JSON object per line; the first is the run's opening (kind "open")."""
CLAIMED = ".replaying-"
"""Suffix (and the replaying pid) of a journal being logged: claimed by a rename, so two replays never log one run
twice."""


def _now() -> int:
    return int(time.time() * 1000)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(src, dst)


class JournalTracker(NullTracker):
    """A :class:`lm.tracking.NullTracker` that records every call in a journal folder for :func:`replay_all`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._events = open(folder / EVENTS, "a", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        self._files = 0

    @classmethod
    def start(cls, journal: Path, record: Mapping[str, Any]) -> JournalTracker:
        """A new journal below `journal` for the run `record` describes (what :func:`lm.tracking.open_run` got)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", record["name"]).strip("-")
        folder = Path(journal) / f"{stamp}-{_now() % 1000:03d}-{os.getpid()}-{slug}"
        folder.mkdir(parents=True)
        tracker = cls(folder)
        tracker._write("open", record={**record, "start_ms": _now()})
        return tracker

    def _write(self, kind: str, **data: Any) -> None:
        # One line per call, flushed: a process killed later keeps every call before it.
        self._events.write(json.dumps({"kind": kind, "time": _now(), **data}) + "\n")
        self._events.flush()

    def _keep(self, path: Path, name: str) -> str:
        """Hard-link (or copy) a file or folder into the journal; its path relative to the journal."""
        self._files += 1
        dst = self.folder / "files" / str(self._files) / name
        dst.parent.mkdir(parents=True)
        if path.is_dir():
            shutil.copytree(path, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(path), str(dst))
        return dst.relative_to(self.folder).as_posix()

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self._write("metrics", step=step, values={k: float(v) for k, v in metrics.items()})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._write("tags", tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None, name: str | None = None) -> None:
        path = Path(path)
        self._write("artifact", file=self._keep(path, name or path.name), artifact_path=artifact_path)

    def log_datasets(self, datasets: Sequence[DatasetRef]) -> None:
        self._write("datasets", records=[d.record() for d in datasets])

    def log_model(self, name: str, folder: Path, step: int = 0) -> None:
        self._write("model", name=name, folder=self._keep(Path(folder), Path(folder).name), step=step)

    def __enter__(self) -> JournalTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._write("end", status=exit_status(kind, exc))
        self._events.close()


def read(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A journal's opening record and its later calls. A last line cut short (the process died mid-write) is
    dropped; any other unreadable line is an error naming the journal."""
    lines = (folder / EVENTS).read_text(encoding="utf-8").splitlines()
    events = []
    for i, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise TrackingError(f"journal {folder / EVENTS}: line {i + 1} is not JSON; fix or delete it") from None
    if not events or events[0].get("kind") != "open":
        raise TrackingError(f"journal {folder / EVENTS} does not start with the run's opening; delete the folder")
    return events[0]["record"], events[1:]


def pending(journal: Path) -> Iterator[Path]:
    """The journals ready to log, oldest first: not being written (their process is gone or has ended the run) and
    not being logged by another live replay (a claim whose replaying process is gone is taken over)."""
    if not Path(journal).is_dir():
        return
    for folder in sorted(Path(journal).iterdir()):
        base, _, claimer = folder.name.partition(CLAIMED)
        if claimer and psutil.pid_exists(int(claimer)):
            continue
        try:
            record, events = read(folder)
        except (OSError, TrackingError):
            yield folder  # replay_all reports it
            continue
        ended = bool(events) and events[-1].get("kind") == "end"
        process = record.get("process", {})
        if not ended and _alive(process.get("lm.pid", ""), process.get("lm.pid_start", "")):
            continue
        yield folder


def replay_all(journal: Path) -> tuple[list[str], list[str]]:
    """Log every pending journal below `journal` to its store (:func:`lm.tracking.replay`), oldest first; remove each
    one that is logged. Returns (names logged, one line per journal that failed: kept for the next replay)."""
    logged, failed = [], []
    for folder in list(pending(journal)):
        base = folder.name.partition(CLAIMED)[0]
        claimed = folder.with_name(f"{base}{CLAIMED}{os.getpid()}")
        try:
            folder.rename(claimed)
        except OSError:  # another replay claimed it first
            continue
        try:
            record, events = read(claimed)
            replay(record, events, claimed)
        except (TrackingError, OSError, KeyError) as e:
            claimed.rename(folder.with_name(base))
            failed.append(f"{base}: {e}")
            continue
        shutil.rmtree(claimed)
        logged.append(record["name"])
    return logged, failed
