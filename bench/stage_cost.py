"""What a pipeline stage costs before and after its own work: ``python -m bench.stage_cost [--repeats N]``.

The default study is 80 stage instances, most of them seconds of work, so the fixed cost of each (start Python,
import torch and MLflow, open the SQLite store, exit, and DVC's rewrite of dvc.lock) adds up to minutes of
`make repro`. Each part is timed in fresh processes, the median of ``--repeats``:

- ``python``: the interpreter alone (``python -c pass``);
- ``import torch``, ``import mlflow``: each alone in a fresh process, start-up subtracted;
- ``open the store``: MlflowClient on an existing SQLite store (what `lm.tracking.open_run` pays after importing
  mlflow; mostly importing MLflow's SQLAlchemy store);
- ``exit``: from the last line of a process that imported torch, mlflow and the store to its end, with Python's
  last garbage collection and without it (``gc.freeze`` at exit, what every stage does: stages.common.study);
- ``dvc.lock rewrite``: DVC's parse-for-update and dump of this repository's dvc.lock, which it does after every
  stage (one process, DVC imported);
- ``a stage's tracking, live`` and ``deferred``: a fresh process that opens a stage's MLflow run as every stage does
  (stages.mlflow_run.tracker: tags, git state, code md5), logs a metric and an artifact and ends it, with
  LM_TRACKING=live (into the SQLite store) and =deferred (into a journal, lm/journal.py; what `make repro` does),
  start-up subtracted; and ``replaying one deferred run``: stages.track's cost per journal, in one process that
  logs ten (its own import of mlflow excluded).

Prints a markdown table; a timing, not a result: nothing under reports/ is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_PROBE = """
import gc, sys, time, atexit
import torch, mlflow
from mlflow import MlflowClient
MlflowClient({uri!r}).search_experiments()
if {freeze}:
    atexit.register(gc.freeze)
print(time.time(), flush=True)
"""
LOCK_PROBE = """
import sys, time
from dvc.utils.serialize import dump_yaml, parse_yaml_for_update
text = open(sys.argv[1]).read()
t0 = time.perf_counter()
data = parse_yaml_for_update(text, sys.argv[1])
t1 = time.perf_counter()
dump_yaml(sys.argv[2], data)
print(t1 - t0, time.perf_counter() - t1)
"""
TRACK_PROBE = """
from pathlib import Path
from stages.common import study
from stages.mlflow_run import tracker
cfg = study(Path("params.yaml"))
with tracker(cfg, "report", {"x": 1}, description="bench.stage_cost") as t:
    t.log_metrics({"runs": 1.0})
    t.log_artifact(Path("params.yaml"))
"""
REPLAY_PROBE = """
import sys, time
from pathlib import Path
import lm.tracking, mlflow.tracking
from lm.journal import replay_all
t0 = time.perf_counter()
logged, failed = replay_all(Path(sys.argv[1]))
assert len(logged) == 10 and not failed, (logged, failed)
print((time.perf_counter() - t0) / len(logged))
"""


def run_s(code: str, *args: str, env: dict[str, str] | None = None) -> float:
    """Wall-clock seconds of `python -c code` in a fresh process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, cwd=ROOT, capture_output=True,
                   env=None if env is None else {**os.environ, **env})  # fmt: skip
    return time.perf_counter() - t0


def tracking_rows(tmp: Path, median, python: float) -> list[tuple[str, float]]:
    """A stage's tracking live and deferred, and stages.track's replay of one deferred run."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'track.db'}", "DVC_ROOT": str(tmp)}
    rows = []
    for mode in ("live", "deferred"):
        run_s(TRACK_PROBE, env={**env, "LM_TRACKING": mode})  # the store and experiment exist before timing
        rows.append(
            (
                f"a stage's tracking, {mode}",
                median(lambda m=mode: run_s(TRACK_PROBE, env={**env, "LM_TRACKING": m})) - python,
            )
        )
    for path in (tmp / "mlflow-journal").iterdir():
        shutil.rmtree(path)
    for _ in range(10):
        run_s(TRACK_PROBE, env={**env, "LM_TRACKING": "deferred"})
    out = subprocess.run([sys.executable, "-c", REPLAY_PROBE, str(tmp / "mlflow-journal")], check=True, cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **env}).stdout  # fmt: skip
    rows.append(("replaying one deferred run (stages.track, per run)", float(out.split()[-1])))
    return rows


def exit_s(uri: str, freeze: bool) -> float:
    """Seconds from a process's last line to its end (torch, mlflow and the store loaded)."""
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE.format(uri=uri, freeze=freeze)], check=True, cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    return time.time() - float(proc.stdout.split()[-1])


def measure(repeats: int, lock: Path) -> list[tuple[str, float]]:
    """(part, median seconds) for every part of a stage's fixed cost."""
    median = lambda f: statistics.median(f() for _ in range(repeats))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        run_s(f"from mlflow import MlflowClient; MlflowClient({uri!r}).search_experiments()")  # create it once
        python = median(lambda: run_s("pass"))
        rows = [("python", python)]
        rows.append(("import torch", median(lambda: run_s("import torch")) - python))
        mlflow = median(lambda: run_s("import mlflow"))
        rows.append(("import mlflow", mlflow - python))
        store = f"import mlflow\nfrom mlflow import MlflowClient\nMlflowClient({uri!r}).search_experiments()"
        rows.append(("open the store (after import mlflow)", median(lambda: run_s(store)) - mlflow))
        rows.append(("exit, with Python's last garbage collection", median(lambda: exit_s(uri, False))))
        rows.append(("exit, gc.freeze at exit (what stages do)", median(lambda: exit_s(uri, True))))
        if lock.is_file():
            rewrite = median(lambda: run_lock(lock, Path(tmp) / "dvc.lock"))
            rows.append((f"dvc.lock rewrite ({lock.stat().st_size // 1024} KB)", rewrite))
        rows += tracking_rows(Path(tmp), median, python)
    return rows


def run_lock(lock: Path, out: Path) -> float:
    """Seconds DVC takes to parse `lock` for an update and dump it again (the process's start-up excluded)."""
    proc = subprocess.run([sys.executable, "-c", LOCK_PROBE, str(lock), str(out)], check=True, cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    return sum(map(float, proc.stdout.split()))


def markdown(rows: list[tuple[str, float]]) -> str:
    lines = ["| part of a stage's fixed cost | seconds |", "|---|---:|"]
    return "\n".join(lines + [f"| {part} | {s:.2f} |" for part, s in rows])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per part; the median is printed")
    p.add_argument("--lock", type=Path, default=ROOT / "dvc.lock", help="the dvc.lock whose rewrite is timed")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    print(markdown(measure(args.repeats, args.lock)))


if __name__ == "__main__":
    main()
