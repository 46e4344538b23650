"""What every stage does first: validate the whole params file, or exit before doing any work; then
open its MLflow run (or fail fast, naming the tracking URI, when the store is unreachable)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from lm.config import ParamsError, StudyConfig, load_params
from lm.tracking import Group, NullTracker, TrackingError, dvc_md5, flatten, git_state, open_run, probe_able, tree_md5

SOURCES = ("dvc.yaml", "params.yaml", "lm", "stages", "pyproject.toml", "requirements.lock")
"""What defines a run: a change here (uncommitted) marks its MLflow run git.dirty. Pipeline outputs are
not listed: the pipeline rewrites them itself (dvc.lock, metrics/ ...) while it runs."""
CODE = ("lm", "stages")
"""The code every stage runs; the md5 of their *.py files is the tag code.md5 (exact even when dirty)."""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file to validate and read (default: params.yaml)")
    return p


MLFLOW_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow's HTTP client retries 7 times with exponential backoff (~8 minutes) by default; a stage gives a dead
server a few seconds (each setting can be overridden in the environment)."""


def study(path: str) -> StudyConfig:
    """Load and validate params (on any problem print one line per problem and exit 2); prepare the process:
    MLflow's settings, and a stop when the `dvc` that runs this stage dies (see :func:`stop_with_dvc`)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The stage prints one line with its run's address itself (MLflow would print two per run).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for key, value in MLFLOW_HTTP.items():
        os.environ.setdefault(key, value)
    try:
        cfg = load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    stop_with_dvc()
    return cfg


def stop_with_dvc(poll_s: float = 0.5) -> None:
    """When this stage runs under `dvc` and that process dies (SIGTERM, SIGKILL), send ourselves SIGTERM: DVC
    does not pass the signal on, and an orphaned stage would keep training and writing outputs that no
    dvc.lock will record. The trainer saves its state and stops; other stages stop (their outputs are atomic)."""
    proc = _dvc_process()
    if proc is None:
        return

    def watch() -> None:
        import psutil

        while True:
            time.sleep(poll_s)
            try:
                dvc = psutil.Process(proc[0])
                if dvc.create_time() == proc[1] and dvc.status() != psutil.STATUS_ZOMBIE:  # dead, not yet reaped
                    continue
            except psutil.Error:
                pass
            print(f"warning: dvc (pid {proc[0]}) is gone: stopping this stage", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)
            return

    threading.Thread(target=watch, name="stop-with-dvc", daemon=True).start()


def entry(section: Mapping[str, Any], name: str, what: str, params: str) -> Any:
    """`section[name]`, or exit 2 naming the entries `params` does define."""
    if name not in section:
        fail(f"unknown {what} {name!r}; {params} defines: {', '.join(sorted(section)) or '(none)'}", 2)
    return section[name]


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit with a one-line error (the message names the problem and the fix)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def deterministic() -> None:
    """Deterministic kernels for the stages that compute results (train, evaluate): an op without a
    deterministic implementation warns instead of failing. cuBLAS needs its workspace fixed before
    CUDA starts for its matmuls to be reproducible."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    # torch.use_deterministic_algorithms(True, warn_only=True), minus its `import torch._inductor.config`: that
    # import alone costs 1.3 s per stage (90 s of the ladder's 68 train and evaluate stages) to set a flag only
    # torch.compile reads; lm.trainer sets it where it compiles.
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# tracking: the stage, not the library, reads the environment


def project_root(env: Mapping[str, str] = os.environ) -> Path:
    """The DVC project the stage belongs to: $DVC_ROOT, which DVC sets for every stage command and, in
    `dvc exp run --temp/--queue`, points at the original project rather than the temporary copy the
    stage runs in (a db there would be deleted with it); the working directory outside DVC."""
    return Path(env.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path, env: Mapping[str, str] = os.environ) -> str:
    """$MLFLOW_TRACKING_URI, else the project's own sqlite database sqlite:///<root>/mlflow.db (absolute)."""
    return env.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{root / 'mlflow.db'}"


def _dvc_process() -> tuple[int, float] | None:
    """(pid, start time) of the `dvc` process this stage runs under (nearest ancestor), if any."""
    try:
        import psutil  # pinned in requirements.lock (an mlflow dependency); without it: no dvc group
    except ImportError:
        return None
    try:
        parents = psutil.Process().parents()
    except psutil.Error:
        return None
    for proc in parents:
        try:
            if any(Path(arg).name in ("dvc", "dvc.exe") for arg in proc.cmdline()[:3]):
                return proc.pid, proc.create_time()
        except psutil.Error:  # e.g. AccessDenied on another user's process: look further up
            continue
    return None


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
    proc = _dvc_process()
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
        **(tags or {}),
    }
    try:
        return open_run(
            cfg.tracking,
            uri,
            run_name(stage),
            params=flatten(params),
            tags=all_tags,
            group=study_group(env, git),
            artifact_root=None if probe_able(uri) else root / "mlartifacts",
            warn=warn,
            relog=relog_command(stage) if relog else None,
            description=description,
            experiment_description=(
                f"{cfg.report.title}: one run per DVC stage, named for what differs first ('names-mlp (train)', "
                f"'names-mlp (evaluate)'); the parent runs are `dvc repro` invocations. The report with every "
                f"table and figure: {root / 'reports' / 'README.md'}."
            ),
        )
    except TrackingError as e:
        fail(f"{stage}: {e}")


def relog_command(stage: str) -> str:
    """This stage's own command line with --log-only: it logs the run again from the outputs, doing no work."""
    args = [a for a in sys.argv[1:] if a != "--log-only"]
    return shlex.join(["python", "-m", f"stages.{stage.split('@')[0]}", *args, "--log-only"])


def run_name(stage: str) -> str:
    """A stage's MLflow run name, what differs first: 'train@names-mlp' → 'names-mlp (train)'; 'report'."""
    verb, _, entry = stage.partition("@")
    return f"{entry} ({verb})" if entry else verb


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
