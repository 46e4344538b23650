"""A stage's MLflow run, set up from the environment (the stage, not the library, reads it): the tracking URI, the
parent run that groups one pipeline invocation's stages, the lineage tags (git state, code md5, DVC md5s of the
data it reads and writes) and the run's name and description. lm/tracking.py, the one module that imports mlflow,
is given all of it."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lm.config import StudyConfig
from lm.journal import JOURNAL_DIR
from lm.provenance import dvc_md5, git_state, tree_md5
from lm.tracking import Group, NullTracker, TrackingError, flatten, open_run, probe_able
from stages.common import fail, warn
from stages.watchdog import dvc_process

SOURCES = ("dvc.yaml", "params.yaml", "lm", "stages", "pyproject.toml", "requirements.lock")
"""What defines a run: a change here (uncommitted) marks its MLflow run git.dirty. Pipeline outputs are
not listed: the pipeline rewrites them itself (dvc.lock, metrics/ ...) while it runs."""
CODE = ("lm", "stages")
"""The code every stage runs; the md5 of their *.py files is the tag code.md5 (exact even when dirty)."""


MLFLOW_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow's HTTP client retries 7 times with exponential backoff (~8 minutes) by default; a stage gives a dead
server a few seconds (each setting can be overridden in the environment)."""


def configure_mlflow() -> None:
    """MLflow's process settings, each overridable in the environment: no telemetry, no run URL printed twice,
    and a dead server given a few seconds rather than minutes (:data:`MLFLOW_HTTP`)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The stage prints one line with its run's address itself (MLflow would print two per run).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for key, value in MLFLOW_HTTP.items():
        os.environ.setdefault(key, value)


TRACKING_MODES = ("live", "deferred")
"""$LM_TRACKING: `live` (the default) logs each stage's run as it happens; `deferred` (what `make repro` sets)
writes it to the project's mlflow-journal/ and `python -m stages.track` logs it afterwards (lm/journal.py)."""


def tracking_mode(env: Mapping[str, str] = os.environ) -> str:
    """$LM_TRACKING, checked: 'live' when unset."""
    mode = env.get("LM_TRACKING", "").strip() or "live"
    if mode not in TRACKING_MODES:
        fail(f"LM_TRACKING={mode!r} is not a tracking mode: set it to {' or '.join(TRACKING_MODES)}, or unset it")
    return mode


def project_root(env: Mapping[str, str] = os.environ) -> Path:
    """The DVC project the stage belongs to: $DVC_ROOT, which DVC sets for every stage command and, in
    `dvc exp run --temp/--queue`, points at the original project rather than the temporary copy the
    stage runs in (a db there would be deleted with it); the working directory outside DVC."""
    return Path(env.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path, env: Mapping[str, str] = os.environ) -> str:
    """$MLFLOW_TRACKING_URI, else the project's own sqlite database sqlite:///<root>/mlflow.db (absolute)."""
    return env.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{root / 'mlflow.db'}"


def study_group(env: Mapping[str, str], git: Mapping[str, str]) -> Group | None:
    """The parent run this stage's run belongs to; every stage of one pipeline invocation agrees on it.

    DVC runs each stage as its own process, so the key must come from what they share:
    1. $LM_STUDY_RUN, if set: the user groups anything they like (e.g. a repro resumed after a failure);
    2. `dvc exp run` (workspace, --temp or --queue): the experiment, named as `dvc exp show` names it;
    3. `dvc repro`: the dvc process itself (pid + start time): one parent per invocation, also when
       the commit and params are unchanged (a commit + params hash would merge two repros of dirty code);
    4. a stage run by hand, outside DVC: no parent.
    """
    commit = git.get("git.commit", "")[:7] or "no git"
    tags = {k: v for k, v in git.items() if k in ("git.commit", "mlflow.source.git.commit", "git.dirty")}
    proc = dvc_process()
    invocation = f"{proc[0]}:{proc[1]:.3f}" if proc else f"{os.getpid()}"
    if key := env.get("LM_STUDY_RUN", "").strip():
        return Group(f"env:{key}", key, tags)
    if exp := env.get("DVC_EXP_NAME", "").strip():
        base = env.get("DVC_EXP_BASELINE_REV", "")
        return Group(
            f"exp:{exp}:{invocation}",
            f"exp {exp} (from {base[:7] or commit})",
            {**tags, "dvc.exp_name": exp, "dvc.exp_baseline": base},
        )
    if proc:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(proc[1]))
        return Group(f"dvc:{invocation}", f"repro {started} ({commit})", tags)
    return None


def tracker(
    cfg: StudyConfig,
    stage: str,
    params: Mapping[str, Any],
    *,
    tags: Mapping[str, str] | None = None,
    deps: Mapping[str, Path] | None = None,
    relog: bool = False,
    description: str | None = None,
) -> NullTracker:
    """Open this stage instance's MLflow run (a no-op tracker when tracking is off); exit 1 with a
    message naming the URI, before any work, when the store is unreachable and tracking is required.

    The run is named for what differs first (`run_name`: 'names-mlp (train)'); `dvc.stage` keeps the stage.
    `params`: nested, logged flattened ('train.lr'); `deps`: the data the stage reads by role ('tokenizer'),
    tagged dvc.dep.<role> with the md5 dvc.lock records (and dvc.dep.<role>.path), so runs of different stages
    line up in MLflow's compare view; `tags`: stage-specific tags (corpus, family, ...); `description`: the
    run's description in the UI.
    `relog`: the stage can log a run again from its outputs (`--log-only`): a tracking failure after the run is
    open then names that command."""
    if not cfg.tracking.enabled:
        return NullTracker()
    configure_mlflow()
    env, cwd = os.environ, Path.cwd()
    root = project_root(env)
    uri = tracking_uri(root, env)
    # Git state and code are those of the workspace that runs (a temp copy under dvc exp --temp).
    git = git_state(cwd, SOURCES)
    code = [p for d in CODE for p in (cwd / d).rglob("*.py")]
    all_tags = {
        "dvc.stage": env.get("DVC_STAGE") or stage,
        **git,
        "code.md5": tree_md5(cwd, code),
        **_paths("dvc.dep", deps or {}),
        **({"dvc.exp_name": env["DVC_EXP_NAME"]} if env.get("DVC_EXP_NAME") else {}),
        "mlflow.source.name": f"stages.{stage.split('@')[0]}",
        **({"mlflow.runColor": color} if (color := run_color(cfg, stage.partition("@")[2])) else {}),
        **(tags or {}),
    }
    try:
        return open_run(
            cfg.tracking,
            uri,
            run_name(stage, env.get("DVC_EXP_NAME", "").strip() or None),
            params=flatten(params),
            tags=all_tags,
            group=study_group(env, git),
            artifact_root=None if probe_able(uri) else root / "mlartifacts",
            warn=warn,
            relog=relog_command(stage) if relog else None,
            description=description,
            journal=root / JOURNAL_DIR if tracking_mode(env) == "deferred" else None,
            experiment_description=(
                f"{cfg.report.title}: one run per DVC stage, named for what differs first ('names-mlp (train)', "
                f"'names-mlp (evaluate)'); the parent runs are `dvc repro` invocations. The report with every "
                f"table and figure: {root / 'reports' / 'README.md'}."
            ),
        )
    except TrackingError as e:
        fail(f"{stage}: {e}")


PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990",
           "#9a6324", "#800000", "#808000", "#000075", "#a9a9a9", "#ffe119", "#dcbeff", "#000000", "#fabed4",
           "#aaffc3", "#ffd8b1")  # fmt: skip
"""Run colours: twenty of the most distinct hues on a white page (Sasha Trubetskoy's 22 without white and beige)."""


def pretrained_tracker(
    cfg: StudyConfig, stage: str, params: Mapping[str, Any], entry, args, description: str
) -> NullTracker:
    """`tracker` for a stage that classifies with a trained run (finetune, probe; `entry` its FinetuneConfig or
    ProbeConfig): tagged with the run, corpus, tokenizer and family, its checkpoint, tokenizer and data as deps."""
    run = cfg.runs[entry.run]
    tags = {"lm.run": entry.run, "corpus": entry.corpus, "tokenizer": run.tokenizer, "family": run.model.family}
    deps = {"model": args.model, "tokenizer": args.tokenizers / run.tokenizer, "data": args.data}
    return tracker(cfg, stage, params, tags=tags, deps=deps, description=description)


def run_color(cfg: StudyConfig, run: str) -> str | None:
    """The colour MLflow's UI draws `run` in (tag mlflow.runColor; its default gives near-identical blues): the
    run's place among its corpus's runs in params.yaml, so the runs of one corpus, charted together, all differ,
    and its train and evaluate runs share one. None for a stage that is not a run's (fetch, report, ...)."""
    if run not in cfg.runs:
        return None
    corpus = lambda r: cfg.tokenizers[cfg.runs[r].tokenizer].corpus  # noqa: E731
    same = [r for r in cfg.runs if corpus(r) == corpus(run)]
    return PALETTE[same.index(run) % len(PALETTE)]


def relog_command(stage: str) -> str:
    """This stage's own command line with --log-only: it logs the run again from the outputs, doing no work."""
    args = [a for a in sys.argv[1:] if a != "--log-only"]
    return shlex.join(["python", "-m", f"stages.{stage.split('@')[0]}", *args, "--log-only"])


def run_name(stage: str, exp: str | None = None) -> str:
    """A stage's MLflow run name, what differs first: 'train@names-mlp' → 'names-mlp (train)'; 'report'. Under
    `dvc exp run` the experiment's name follows the run's, so two experiments' runs of a stage tell apart:
    'names-mlp [stout-pail] (train)' (the verb stays last: filters on "LIKE '%(train)'" still find it)."""
    verb, _, entry = stage.partition("@")
    tag = f" [{exp}]" if exp else ""
    return f"{entry}{tag} ({verb})" if entry else f"{verb}{tag}"


def outputs(run: NullTracker, **paths: Path) -> None:
    """Tag the stage's outputs by role with the md5 dvc.lock will record (dvc.out.<role>, and .path): the join
    key between a producing run and the runs that consume it (their dvc.dep.<role>)."""
    run.set_tags(_paths("dvc.out", {role: p for role, p in paths.items() if Path(p).exists()}))


def _paths(prefix: str, paths: Mapping[str, Path]) -> dict[str, str]:
    out = {}
    for role, p in paths.items():
        out[f"{prefix}.{role}"] = dvc_md5(Path(p))
        out[f"{prefix}.{role}.path"] = _rel(Path(p))
    return out


def describe(cfg: StudyConfig, run: str) -> str:
    """A run's description for the UI: family, corpus, tokenizer, shape and training settings."""
    r = cfg.runs[run]
    tok = cfg.tokenizers[r.tokenizer]
    shape = ", ".join(f"{k} {v}" for k, v in r.model.model_dump().items() if k != "family")
    vocab = f" {tok.vocab_size}" if tok.vocab_size else ""
    t = r.train
    steps = (
        "fitted by counting"
        if r.model.fitting == "counting"
        else f"{t.max_steps} steps × batch {t.batch_size}, lr {t.lr:g}"
    )
    return f"{r.model.family} on {tok.corpus} ({r.tokenizer}: {tok.kind}{vocab}); {shape or 'no settings'}; {steps}"


def _rel(path: Path) -> str:
    """A path as dvc.yaml names it: relative to the working directory where possible, '/'-separated."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()
