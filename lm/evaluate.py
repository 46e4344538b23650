"""The evaluate stage as a library call: score a checkpoint on whole splits, sample from it, write its outputs.

metrics/<run>.json   val/ and test/ loss, ppl, bpc, tokens, characters; train/ summary; params by component
samples/<run>.txt    seeded samples (lm.generate)

One metrics dict feeds the JSON, the stage's MLflow run (`logger`) and the report. The metric definitions and
the scorer are in lm/metrics.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lm import batches as B
from lm import checkpoint
from lm.config import EvaluateConfig
from lm.distributed import pick_device
from lm.generate import format_samples, samples
from lm.io import atomic_write_text, write_json
from lm.metrics import metrics, score
from lm.model_size import component_counts
from lm.tokenizer import load_ids, load_stats, load_tokenizer
from lm.tracking import NullTracker, numeric_leaves, split_datasets


def evaluate_run(
    name: str,
    model_dir: Path,
    tok_dir: Path,
    cfg: EvaluateConfig,
    metrics_path: Path,
    samples_path: Path,
    *,
    device: str | None = None,
    logger: NullTracker | None = None,
) -> dict:
    """Score every evaluation split in full, draw seeded samples, and write metrics JSON + samples;
    `logger` gets the same numbers (params_by_component as params/<component>) and both files.

    `device`: where to compute ('auto', 'cpu', 'cuda', 'mps'); None, the run's own train.device, so a run
    trained on a GPU is evaluated there. Scoring runs in float32 whatever train.dtype was."""
    logger = logger or NullTracker()

    model, run, vocab_size = checkpoint.load(model_dir, "cpu")
    device = pick_device(device or run.train.device)
    model.to(device)
    stats, tokenizer = load_stats(tok_dir), load_tokenizer(tok_dir)
    logger.log_datasets(split_datasets(tok_dir, stats, {"val": "evaluation", "test": "evaluation"}))
    out: dict = {"run": name, "family": run.model.family, "tokenizer": run.tokenizer, "vocab_size": vocab_size}
    for split in ("val", "test"):
        if split not in stats["splits"]:
            continue
        ids = load_ids(tok_dir, split)
        batches = B.for_model(run.model, ids, stats["format"], stats.get("boundary_id"))
        total, count = score(model, batches.iterate(cfg.batch_size), device)
        # Every token but the split's first is scored: bpc divides by the characters those decode to.
        characters = stats["splits"][split]["characters"] - len(tokenizer.decode([int(ids[0])]))
        for k, v in metrics(total, count, characters).items():
            out[f"{split}/{k}"] = v
    train_info = model_dir / "train.json"
    if train_info.exists():
        t = json.loads(train_info.read_text())
        out.update({"train/loss": t["train_loss"], "train/steps": t["steps"], "train/tokens": t["tokens"]})
        out["train/selected_step"] = t.get("selected_step", t["steps"])
    dist = component_counts(model)
    out["params"] = sum(dist.values())
    out["params_by_component"] = dist
    out.update(_inside(model, run, tokenizer, tok_dir, stats, vocab_size, cfg, device))
    texts = samples(model, tokenizer, stats["format"], stats.get("boundary_id"), cfg, device)
    write_json(metrics_path, out)
    atomic_write_text(samples_path, format_samples(texts, stats["format"]))
    logger.set_tags({"device": str(device), "torch": torch.__version__})
    log_outputs(logger, metrics_path, samples_path)
    return out


def _inside(model, run, tokenizer, tok_dir: Path, stats: dict, vocab_size: int, cfg: EvaluateConfig, device) -> dict:
    """What lm.inspection measures: each attention head's previous-token and induction scores ('heads'), and for
    text corpora the quality of continuations of fixed val prompts ('quality': BLEU, chrF, distinct-n, copying)."""
    from lm.inspection import generation_quality, head_scores

    out: dict = {}
    val_ids = load_ids(tok_dir, "val")
    if run.model.context == "window" and (heads := head_scores(model, val_ids, vocab_size, run.model.block_size)):
        out["heads"] = heads
    if stats["format"] == "text" and cfg.quality_prompts:
        decode = lambda split: tokenizer.decode(np.asarray(load_ids(tok_dir, split)).tolist())  # noqa: E731
        val_text = decode("val")
        if len(val_text) >= cfg.prompt_chars + cfg.continuation_chars:
            out["quality"] = generation_quality(model, tokenizer, val_text, decode("train"), cfg, device)
        else:
            print(
                f"note: no generation-quality scores: the val text has {len(val_text)} characters, fewer than "
                f"evaluate.prompt_chars + evaluate.continuation_chars = {cfg.prompt_chars + cfg.continuation_chars}",
                file=sys.stderr,
            )
    return out


def log_outputs(logger: NullTracker, metrics_path: Path, samples_path: Path) -> None:
    """Log an evaluate stage's written outputs: the metrics JSON as metrics (params_by_component as
    params/<component>, at the run's last training step) and both files as artifacts. The stage calls it
    after writing them; `python -m stages.evaluate ... --log-only` calls it again later to re-log a run."""
    out = json.loads(Path(metrics_path).read_text())
    # One metrics dict feeds the JSON, MLflow and the report.
    logger.log_metrics(
        {k.replace("params_by_component", "params"): v for k, v in numeric_leaves(out).items()},
        step=int(out.get("train/steps", 0)),
    )
    # At the root, under fixed names: MLflow's compare view lines up the root files of the runs it compares.
    logger.log_artifact(metrics_path, name="metrics.json")
    logger.log_artifact(samples_path, name="samples.txt")
