"""Log to MLflow what the stages deferred and what `dvc repro` skipped.

    python -m stages.track [--params params.yaml]      (`make repro` runs it after `dvc repro`; `make track`)

1. Deferred runs: `make repro` runs the stages with LM_TRACKING=deferred, so each writes its run to
   mlflow-journal/ instead of importing MLflow (docs/mlflow.md, Cost); every journal is logged here, in one process,
   with its own times (lm/journal.py), and removed. A journal that fails to log is kept for the next `make track`.
2. Skipped runs: every train and evaluate stage of dvc.lock whose outputs no run of the study's experiment holds
   yet is run again with --log-only, which logs its committed outputs and computes nothing.

Why: a stage DVC does not run is not logged, and MLflow can lack runs whose outputs are current: the store was
deleted or is a new one (another MLFLOW_TRACKING_URI), the server was down (`tracking.required: false`), or the
outputs came from a `dvc pull`. Logging from the outputs is exact (the numbers are the files, matched by the md5
dvc.lock records), cheap (seconds, no scoring) and marked (tag lm.relogged=true). Not a DVC stage: it writes no
output.
"""

from __future__ import annotations

import importlib
import os
import shlex
from pathlib import Path

import yaml

from lm.journal import JOURNAL_DIR
from stages.common import fail, parser, study
from stages.mlflow_run import configure_mlflow, project_root, tracking_uri

VERBS = ("train", "evaluate")
"""The stages whose runs the study's comparisons need (the others rerun in seconds if wanted)."""


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--lock", type=Path, default=Path("dvc.lock"), help="DVC lock file (default: dvc.lock)")
    args = p.parse_args(argv)
    cfg = study(args.params)
    configure_mlflow()
    _replay(project_root() / JOURNAL_DIR)
    if not cfg.tracking.enabled:
        print("track: tracking.enabled is false: nothing to log")
        return
    if not args.lock.is_file():
        fail(f"track: {args.lock} not found: run `dvc repro` first")
    stages = yaml.safe_load(args.lock.read_text()).get("stages", {})
    uri = tracking_uri(project_root(), os.environ)

    from lm.tracking import logged

    todo = []
    for stage, entry in stages.items():
        verb, _, run = stage.partition("@")
        outs = entry.get("outs", [])
        if verb in VERBS and run in cfg.runs and outs and Path(outs[0]["path"]).exists():
            if not logged(cfg.tracking, uri, stage, outs[0]["md5"]):
                todo.append((stage, shlex.split(entry["cmd"])))
    failed = []
    for stage, cmd in todo:
        module, stage_args = cmd[2], cmd[3:]  # python -m <module> <args>
        try:
            importlib.import_module(module).main([*stage_args, "--params", args.params, "--log-only"])
        except SystemExit as e:
            if e.code not in (0, None):
                failed.append(stage)
    done = len(todo) - len(failed)
    print(f"track: {done} stage runs logged from their outputs" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)


def _replay(journal: Path) -> None:
    """Log the deferred runs (step 1); exit 1 naming each journal that failed (kept for the next try)."""
    from lm.journal import replay_all

    logged, failed = replay_all(journal)
    if logged or failed:
        print(f"track: {len(logged)} deferred stage runs logged from {journal}")
    if failed:
        fail(
            "track: these journals could not be logged and are kept for the next `make track`:\n  "
            + "\n  ".join(failed)
        )


if __name__ == "__main__":
    main()
