"""The train stage as a library call: build a run's model, fit it, and write its outputs atomically.

models/<run>/      model.safetensors, config.json (checkpoint), train.json (summary), health.json (train.health_every)
curves/<run>.csv   step, tokens, train_loss, val_loss, lr (one row per evaluation)

Both hold only numbers a rerun reproduces bit for bit (on the same machine and device); wall-clock figures
(train seconds, tokens/s) go to the stage's MLflow run only (`logger`, a no-op `NullTracker` by default).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from lm import batches as B
from lm import checkpoint, distributed, memory, precision
from lm.atomic import atomic_dir, atomic_write_text, exclusive, write_json
from lm.config import RunConfig
from lm.models import build_model
from lm.tokenizer import load_ids, load_stats
from lm.tracking import CurveLogger, NullTracker, split_datasets
from lm.trainer import fit

CURVE_FIELDS = ["step", "tokens", "train_loss", "val_loss", "lr"]


def _split_batches(run: RunConfig, tok_dir: Path, split: str) -> B.Batches:
    stats = load_stats(tok_dir)
    return B.for_model(run.model, load_ids(tok_dir, split), stats["format"], stats.get("boundary_id"))


def fingerprint(run: RunConfig, tok_dir: Path, code: Mapping[str, str] | None = None) -> dict:
    """What a saved training state must match to be resumed: the run's config (except how often it
    checkpoints and which device it runs on), the exact training tokens, and the code that shapes training
    (`code`: sha256 by file, lm.provenance.code_digests of the stage's module)."""
    cfg = run.model_dump(mode="json")
    for key in ("checkpoint_interval", "device"):
        cfg["train"].pop(key)
    tokens = np.ascontiguousarray(load_ids(tok_dir, "train")).tobytes()
    return {
        "config": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
        "tokens": hashlib.sha256(tokens).hexdigest(),
        "code": dict(code or {}),
    }


def train_run(
    name: str,
    run: RunConfig,
    tok_dir: Path,
    out: Path,
    curve: Path,
    *,
    logger: NullTracker | None = None,
    log_weights: bool = False,
    progress: bool = True,
    code: Mapping[str, str] | None = None,
    on_eval: Callable[[torch.nn.Module, dict[str, float]], None] | None = None,
) -> dict:
    """Build, fit and checkpoint one run; every output appears at once (atomic writes). `logger` gets the
    curve as it is made, then the summary and the files (model.safetensors only if `log_weights`).

    The resumable state lives beside `out` (`checkpoint.state_dir_for`) while training runs; it is resumed by
    the next call if this one is killed (when params, tokens and `code`, the digests of the code that runs,
    still match), and removed once the outputs are in place. One process at a time trains a run (a lock
    beside `out`). Under torchrun every rank trains, rank 0 alone writes. `on_eval(model, row)` is called at each of
    the training loop's evaluations (`lm.trainer.fit`'s row, with its wall-clock figures)."""
    logger = CurveLogger(logger or NullTracker(), load_stats(tok_dir))
    rank = distributed.rank()
    with exclusive(checkpoint.lock_path_for(out), f"train@{name}") if rank == 0 else nullcontext():
        stats = load_stats(tok_dir)
        vocab_size = int(stats["vocab_size"])
        # Shapes are checked (too-short splits, too-long names) before any model is built.
        train, val = _split_batches(run, tok_dir, "train"), _split_batches(run, tok_dir, "val")
        device = distributed.pick_device(run.train.device)
        if run.train.threads:
            torch.set_num_threads(run.train.threads)
        # 'auto' becomes the dtype this machine trains in; the run, its fingerprint and train.json carry that one.
        dtype = precision.resolve(run.train.dtype, device)
        run = run.model_copy(update={"train": run.train.model_copy(update={"dtype": dtype.dtype})})
        memory.check_training(run, vocab_size, device)  # before anything is allocated
        torch.manual_seed(run.train.seed)
        model = build_model(run.model, vocab_size)
        state = checkpoint.state_dir_for(out)
        fp = fingerprint(run, tok_dir, code)
        if rank == 0:
            logger.log_datasets(split_datasets(tok_dir, stats, {"train": "training", "val": "validation"}))
        with logger.system_metrics() if rank == 0 else nullcontext():
            hook = (lambda row: on_eval(model, row)) if on_eval else None
            result = fit(model, train, val, run.train, device=device, logger=logger, progress=progress,
                         state_dir=state, fingerprint=fp, on_eval=hook)  # fmt: skip
        summary, timing = _summary(name, run, model, result, device)
        if rank == 0:
            _write_outputs(model.cpu(), run, vocab_size, summary, result.curve, out, curve, state, result.health)
    if rank == 0:
        logger.log_metrics({"summary/train_seconds": timing["train_seconds"]}, step=result.steps)
        logger.set_tags({k: str(timing[k]) for k in ("device", "torch", "threads", "machine")})
        if "dtype" in summary:
            logger.set_tags({"dtype": summary["dtype"], "dtype.reason": dtype.reason})
        log_outputs(logger, out, curve, tok_dir, log_weights=log_weights)
    return {**summary, **timing}


def _summary(name: str, run: RunConfig, model, result, device) -> tuple[dict, dict]:
    """train.json's numbers (only what a rerun reproduces bit for bit) and the wall-clock ones (MLflow alone)."""
    selected = next((r for r in result.curve if r["step"] == result.selected_step), result.curve[-1])
    summary = {
        "run": name,
        "family": run.model.family,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": result.steps,
        "keep": run.train.keep if run.model.fitting == "gradient" else "last",
        "selected_step": selected["step"],
        "train_loss": selected["train_loss"],
        "val_loss": selected["val_loss"],
        "tokens": result.tokens,
    }
    if run.model.fitting == "gradient":
        summary["dtype"] = run.train.dtype  # resolved: what the forward pass autocast to (lm.precision)
    timing = {
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    return summary, timing


WRITE_RETRY_S, WRITE_RETRY_EVERY_S = 600.0, 10.0
"""When the finished run's outputs cannot be written (a full disk), the trained model is held in memory and the
write retried every WRITE_RETRY_EVERY_S seconds for WRITE_RETRY_S, after saying what to free: the steps since the
last saved state are not thrown away for want of a few megabytes."""


def _write_outputs(
    model,
    run: RunConfig,
    vocab_size: int,
    summary: dict,
    rows: list,
    out: Path,
    curve: Path,
    state: Path,
    health: list[dict] | None = None,
) -> None:
    """Checkpoint + train.json (+ health.json with train.health_every; one atomic directory) and the curve CSV;
    then the training state goes. A write that fails is retried (:data:`WRITE_RETRY_S`) and then raises
    NotWritten, whose message names the step the kept state really holds."""
    deadline, told = time.monotonic() + WRITE_RETRY_S, False
    while True:
        try:
            with atomic_dir(out) as tmp:
                checkpoint.save(model, run, vocab_size, tmp)
                write_json(tmp / "train.json", summary)
                if health:
                    write_json(tmp / "health.json", {"run": summary["run"], "records": health})
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(curve, buf.getvalue())
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise NotWritten(_not_written(e, state, summary["steps"])) from e
            if not told:
                mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
                print(f"warning: {e}; the trained model (step {summary['steps']}) is held in memory: free at least "
                      f"{max(mb, 0.1):.1f} MB in {out.parent}; retrying every {WRITE_RETRY_EVERY_S:.0f} s for "
                      f"{WRITE_RETRY_S / 60:.0f} min (Ctrl-C gives up)", file=sys.stderr, flush=True)  # fmt: skip
                told = True
            try:
                time.sleep(WRITE_RETRY_EVERY_S)
            except KeyboardInterrupt:
                raise NotWritten(_not_written(e, state, summary["steps"])) from e
    shutil.rmtree(state, ignore_errors=True)  # the outputs are complete: nothing left to resume


def _not_written(error: OSError, state: Path, steps: int) -> str:
    """The message when the outputs could not be written: the step the kept state really holds, if any."""
    kept = checkpoint.saved_step(state)
    if kept == steps:
        return (f"{error}. The trained model is kept in {state} (step {steps}): run the stage again once the "
                "problem is fixed; it resumes there and only writes the outputs")  # fmt: skip
    if kept is not None:
        return (f"{error}. Saving the final state failed too: {state} holds step {kept} of {steps}. Run the stage "
                f"again once the problem is fixed: it resumes at step {kept} and trains steps {kept + 1}-{steps} "
                "again, to the same result")  # fmt: skip
    return f"{error}. No training state could be saved: run the stage again once the problem is fixed (from step 0)"


class NotWritten(RuntimeError):
    """Training finished but its outputs could not be written; the message says where the model is kept."""


def log_outputs(
    logger: NullTracker, out: Path, curve: Path, tok_dir: Path, *, log_weights: bool = False, history: bool = False
) -> None:
    """Log a train stage's written outputs: the final numbers of train.json, the files as artifacts
    (model.safetensors only if `log_weights`) and, with `history`, the curve CSV as step metrics (the stage
    logs those live while training). `python -m stages.train ... --log-only` calls it with `history` to
    re-log a run whose tracking failed, from the outputs alone (wall-clock figures are not among them)."""
    summary = json.loads((Path(out) / "train.json").read_text())
    if history:
        curve_logger = CurveLogger(logger, load_stats(tok_dir))
        with open(curve, newline="") as f:
            for row in csv.DictReader(f):
                curve_logger.log_metrics({k: float(v) for k, v in row.items() if k != "step"}, step=int(row["step"]))
    # Final numbers as summary/ (the curve's `tokens_seen` history already ends at the total).
    logger.log_metrics(
        {"summary/params": summary["params"], "summary/steps": summary["steps"],
         "summary/selected_step": summary.get("selected_step", summary["steps"])},
        step=0,
    )  # fmt: skip
    logger.log_artifact(tok_dir / "tokenizer.json", "tokenizer")
    for f in (checkpoint.CONFIG, "train.json"):
        logger.log_artifact(Path(out) / f, "checkpoint")
    if log_weights:  # the whole checkpoint as an MLflow 3 logged model (its Models tab), output of this run
        logger.log_model(Path(out).name, Path(out), step=summary["steps"])
    logger.log_artifact(curve, name="curve.csv")  # at the root: MLflow's compare view lines up root files only
