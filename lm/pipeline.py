"""What the train and evaluate stages do, as library calls (the stages only parse arguments).

models/<run>/   model.safetensors, config.json (checkpoint), train.json (summary)
curves/<run>.csv   step, train_loss, val_loss, lr, tokens_per_s, elapsed_s (one row per evaluation)
metrics/<run>.json and samples/<run>.txt   from the evaluate stage
"""

from __future__ import annotations

import csv
import io
import json
import platform
from pathlib import Path

import torch

from lm import batches as B
from lm import checkpoint
from lm.config import EvaluateConfig, RunConfig
from lm.io import atomic_dir, atomic_write_text, write_json
from lm.tokenizer import load_ids, load_stats, load_tokenizer
from lm.train import NullLogger, fit, pick_device

CURVE_FIELDS = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]


def _split_batches(run: RunConfig, tok_dir: Path, split: str) -> B.Batches:
    stats = load_stats(tok_dir)
    return B.for_model(run.model, load_ids(tok_dir, split), stats["format"], stats.get("boundary_id"))


def train_run(name: str, run: RunConfig, tok_dir: Path, out: Path, curve: Path, *, logger=None, progress: bool = True) -> dict:
    """Build, fit and checkpoint one run; every output appears at once (atomic directory)."""
    from lm.models import build_model

    stats = load_stats(tok_dir)
    vocab_size = int(stats["vocab_size"])
    # Shapes are checked (too-short splits, too-long names) before any model is built.
    train, val = _split_batches(run, tok_dir, "train"), _split_batches(run, tok_dir, "val")
    device = pick_device(run.train.device)
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, vocab_size)
    result = fit(model, train, val, run.train, device=device, logger=logger or NullLogger(), progress=progress)
    summary = {
        "run": name,
        "family": run.model.family,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": result.steps,
        "train_loss": result.curve[-1]["train_loss"],
        "val_loss": result.curve[-1]["val_loss"],
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
        "tokens": result.tokens,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    with atomic_dir(out) as tmp:
        checkpoint.save(model.cpu(), run, vocab_size, tmp)
        write_json(tmp / "train.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(result.curve)
    atomic_write_text(curve, buf.getvalue())
    return summary


def evaluate_run(name: str, model_dir: Path, tok_dir: Path, cfg: EvaluateConfig, metrics_path: Path,
                 samples_path: Path, *, device: str = "cpu") -> dict:
    """Score every evaluation split in full, draw seeded samples, and write metrics JSON + samples."""
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
        out.update({"train/loss": t["train_loss"], "train/seconds": t["train_seconds"], "train/tokens_per_s": t["tokens_per_s"],
                    "train/steps": t["steps"]})
    dist = parameter_distribution(model)
    out["params"] = sum(dist.values())
    out["params_by_component"] = dist
    texts = samples(model, tokenizer, stats["format"], stats.get("boundary_id"), cfg, device)
    sep = "\n" if stats["format"] == "lines" else "\n\n" + "-" * 72 + "\n\n"
    write_json(metrics_path, out)
    atomic_write_text(samples_path, sep.join(texts) + "\n")
    return out
