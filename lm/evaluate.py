"""The evaluate stage as a library call: score a checkpoint on whole splits, sample from it, write its outputs.

metrics/<run>.json       val/ and test/ loss, ppl, bpc, tokens, characters; train/ summary; params by component;
                         all/ for a counted run of a 'lines' corpus (fitted and scored on every split, as makemore)
samples/<run>.txt        seeded samples (lm.generate)
inside/<run>.safetensors what the report draws of the model (lm.inspection.figure_arrays)

One metrics dict feeds the JSON, the stage's MLflow run (`logger`) and the report. The metric definitions and
the scorer are in lm/metrics.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from lm import batches as B
from lm import checkpoint
from lm.atomic import atomic_write_bytes, atomic_write_text, write_json
from lm.config import EvaluateConfig
from lm.distributed import pick_device
from lm.generate import format_samples, samples
from lm.inspection import figure_arrays
from lm.metrics import metrics, score
from lm.model_size import component_counts
from lm.models import build_model
from lm.tokenizer import load_ids, load_stats, load_tokenizer
from lm.tracking import NullTracker, numeric_leaves, split_datasets


def evaluate_run(
    name: str,
    model_dir: Path,
    tok_dir: Path,
    cfg: EvaluateConfig,
    metrics_path: Path,
    samples_path: Path,
    inside_path: Path,
    *,
    device: str | None = None,
    logger: NullTracker | None = None,
) -> dict:
    """Score every evaluation split in full, draw seeded samples, and write metrics JSON, samples and the arrays
    the report draws (attention on the val passage at character `cfg.attention_offset`, ...); `logger` gets the same
    numbers (params_by_component as params/<component>) and the metrics and samples files.

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
    out.update(_train_info(model_dir / "train.json"))
    dist = component_counts(model)
    out["params"] = sum(dist.values())
    out["params_by_component"] = dist
    out.update(_inside(model, run, tokenizer, tok_dir, stats, vocab_size, cfg, device))
    if run.model.fitting == "counting" and stats["format"] == "lines":
        out.update(_all_splits(run, tok_dir, stats, vocab_size))
    texts = samples(model, tokenizer, stats["format"], stats.get("boundary_id"), cfg, device)
    arrays, meta = figure_arrays(
        model, run.model, tokenizer, stats["kind"], load_ids(tok_dir, "val"), cfg.attention_offset
    )
    write_json(metrics_path, out)
    atomic_write_text(samples_path, format_samples(texts, stats["format"]))
    atomic_write_bytes(inside_path, save_safetensors(arrays, metadata=meta))
    logger.set_tags({"device": str(device), "torch": torch.__version__})
    if "train/dtype" in out:
        logger.set_tags({"train.dtype": out["train/dtype"]})
    log_outputs(logger, metrics_path, samples_path)
    return out


def _train_info(path: Path) -> dict:
    """What the metrics repeat of train.json (none for a checkpoint without it): the train loss, steps, tokens, the
    kept step and, for gradient-trained runs, the dtype the forward pass ran in."""
    if not path.exists():
        return {}
    t = json.loads(path.read_text())
    out = {"train/loss": t["train_loss"], "train/steps": t["steps"], "train/tokens": t["tokens"]}
    out["train/selected_step"] = t.get("selected_step", t["steps"])
    return out | ({"train/dtype": t["dtype"]} if "dtype" in t else {})


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


def _all_splits(run, tok_dir: Path, stats: dict, vocab_size: int) -> dict:
    """The in-sample number makemore lecture 1 reports: the family fitted by counting on every split of the corpus
    and scored on every split, as 'all/loss' and 'all/tokens' (the published value is in lm/references.py)."""
    model = build_model(run.model, vocab_size)
    splits = [
        B.for_model(run.model, load_ids(tok_dir, split), stats["format"], stats.get("boundary_id"))
        for split in stats["splits"]
    ]
    for batches in splits:
        for x, y in batches.iterate(4096):
            model.accumulate(x, y)
    scored = [score(model, batches.iterate(4096)) for batches in splits]
    total, count = sum(t for t, _ in scored), sum(c for _, c in scored)
    return {"all/loss": total / count, "all/tokens": count}


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
