"""What the train and evaluate stages do, as library calls (the stages only parse arguments).

models/<run>/   model.safetensors, config.json (checkpoint), train.json (summary)
curves/<run>.csv   step, train_loss, val_loss, lr, tokens_per_s, elapsed_s (one row per evaluation)
metrics/<run>.json and samples/<run>.txt   from the evaluate stage

models/<run>/ and metrics/<run>.json hold only numbers a rerun reproduces bit for bit (on the same
machine and device); wall-clock figures live in the curve CSV and in MLflow.

Both also log to the stage's MLflow run (`tracker`, a no-op `NullTracker` by default): the training
loop's per-evaluation metrics, the final numbers, and the files above as artifacts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from lm import batches as B
from lm import checkpoint
from lm.config import EvaluateConfig, RunConfig
from lm.io import atomic_dir, atomic_write_text, write_json
from lm.tokenizer import load_ids, load_stats, load_tokenizer
from lm.tracking import NullTracker, numeric_leaves
from lm.train import fit, pick_device

CURVE_FIELDS = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]


def _split_batches(run: RunConfig, tok_dir: Path, split: str) -> B.Batches:
    stats = load_stats(tok_dir)
    return B.for_model(run.model, load_ids(tok_dir, split), stats["format"], stats.get("boundary_id"))


def fingerprint(run: RunConfig, tok_dir: Path) -> str:
    """What a saved training state must match to be resumed: the run's config (except how often it
    checkpoints and which device it runs on) and the exact training tokens."""
    cfg = run.model_dump(mode="json")
    for key in ("checkpoint_interval", "device"):
        cfg["train"].pop(key)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    h.update(np.ascontiguousarray(load_ids(tok_dir, "train")).tobytes())
    return h.hexdigest()


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
) -> dict:
    """Build, fit and checkpoint one run; every output appears at once (atomic directory). `logger` gets
    the curve as it is made, then the summary and the files (model.safetensors only if `log_weights`).

    The resumable state lives beside `out` (`checkpoint.state_dir_for`) while training runs; it is
    resumed by the next call if this one is killed, and removed once the outputs are in place. Under
    torchrun every rank trains, rank 0 alone writes."""
    logger = logger or NullTracker()
    from lm.models import build_model

    stats = load_stats(tok_dir)
    vocab_size = int(stats["vocab_size"])
    # Shapes are checked (too-short splits, too-long names) before any model is built.
    train, val = _split_batches(run, tok_dir, "train"), _split_batches(run, tok_dir, "val")
    device = pick_device(run.train.device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, vocab_size)
    state = checkpoint.state_dir_for(out)
    result = fit(
        model,
        train,
        val,
        run.train,
        device=device,
        logger=logger,
        progress=progress,
        state_dir=state,
        fingerprint=fingerprint(run, tok_dir),
    )
    # Only numbers that a rerun reproduces bit for bit: timing lives in the curve and in MLflow.
    summary = {
        "run": name,
        "family": run.model.family,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": result.steps,
        "train_loss": result.curve[-1]["train_loss"],
        "val_loss": result.curve[-1]["val_loss"],
        "tokens": result.tokens,
    }
    timing = {
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if rank != 0:
        return {**summary, **timing}
    with atomic_dir(out) as tmp:
        checkpoint.save(model.cpu(), run, vocab_size, tmp)
        write_json(tmp / "train.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(result.curve)
    atomic_write_text(curve, buf.getvalue())
    shutil.rmtree(state, ignore_errors=True)  # the outputs are complete: nothing left to resume
    # Final numbers under their own names: the step metrics' histories keep one point per evaluation.
    logger.log_metrics(
        {
            "params": summary["params"],
            "steps": summary["steps"],
            "tokens": summary["tokens"],
            "train_seconds": timing["train_seconds"],
        },
        step=result.steps,
    )
    logger.set_tags({k: str(timing[k]) for k in ("device", "torch", "threads", "machine")})
    logger.log_artifact(tok_dir / "tokenizer.json", "tokenizer")
    for f in [checkpoint.CONFIG, "train.json"] + ([checkpoint.WEIGHTS] if log_weights else []):
        logger.log_artifact(out / f, "checkpoint")
    logger.log_artifact(curve, "curve")
    return {**summary, **timing}


def evaluate_run(
    name: str,
    model_dir: Path,
    tok_dir: Path,
    cfg: EvaluateConfig,
    metrics_path: Path,
    samples_path: Path,
    *,
    device: str = "cpu",
    logger: NullTracker | None = None,
) -> dict:
    """Score every evaluation split in full, draw seeded samples, and write metrics JSON + samples;
    `logger` gets the same numbers (params_by_component as params/<component>) and both files."""
    logger = logger or NullTracker()
    from lm.evaluate import metrics, parameter_distribution, samples, score

    model, run, vocab_size = checkpoint.load(model_dir, device)
    stats, tokenizer = load_stats(tok_dir), load_tokenizer(tok_dir)
    out: dict = {"run": name, "family": run.model.family, "tokenizer": run.tokenizer, "vocab_size": vocab_size}
    for split in ("val", "test"):
        if split not in stats["splits"]:
            continue
        ids = load_ids(tok_dir, split)
        batches = B.for_model(run.model, ids, stats["format"], stats.get("boundary_id"))
        total, count = score(model, batches, cfg.batch_size, device)
        # Every token but the split's first is scored: bpc divides by the characters those decode to.
        characters = stats["splits"][split]["characters"] - len(tokenizer.decode([int(ids[0])]))
        for k, v in metrics(total, count, characters).items():
            out[f"{split}/{k}"] = v
    train_info = model_dir / "train.json"
    if train_info.exists():
        t = json.loads(train_info.read_text())
        out.update({"train/loss": t["train_loss"], "train/steps": t["steps"], "train/tokens": t["tokens"]})
    dist = parameter_distribution(model)
    out["params"] = sum(dist.values())
    out["params_by_component"] = dist
    texts = samples(model, tokenizer, stats["format"], stats.get("boundary_id"), cfg, device)
    sep = "\n" if stats["format"] == "lines" else "\n\n" + "-" * 72 + "\n\n"
    write_json(metrics_path, out)
    atomic_write_text(samples_path, sep.join(texts) + "\n")
    # One metrics dict feeds the JSON, MLflow and the report (train/steps is the run's last step).
    logger.log_metrics(
        {k.replace("params_by_component", "params"): v for k, v in numeric_leaves(out).items()},
        step=int(out.get("train/steps", 0)),
    )
    logger.set_tags({"device": str(device), "torch": torch.__version__})
    logger.log_artifact(metrics_path, "metrics")
    logger.log_artifact(samples_path, "samples")
    return out
