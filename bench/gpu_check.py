"""The sources preset's Shakespeare GPT on a GPU, through the study's own code, beside nanoGPT's loop on the same GPU:
``python -m bench.gpu_check [--steps N] [--out FILE]`` (bench/gpu.sh runs it on a lent device).

1. **Study**: `presets/sources.yaml`'s ``shakespeare-gpt`` (Let's build GPT's) trained by `lm.train_run.train_run` (the
   train stage's library call: compile, fused AdamW and TF32 'auto', bf16 autocast, keep-best), then scored by
   `lm.evaluate.evaluate_run` (the evaluate stage's) on the whole val split, on the run's device.
2. **Reference**: bench/nanogpt.py, nanoGPT's ``train_shakespeare_char`` written plainly (no study code), with
   the run's shape and schedule, which for the sources preset's run are nanoGPT's config (no biases, as nanoGPT).
   Its kept model is scored on the same whole val split by the study's one scorer (`lm.metrics.score`), so the two
   numbers are the same measurement.

3. **Race** (issue: time to quality): the study's model is also scored on the whole val split at each of its training
   evaluations; its time to target is its training time (evaluations excluded, as on the reference's side) up to the
   first of those at or under the target, where the target is the reference's whole-split val loss on the day (and
   the published one), and the time-to-target ratio is the reference's training time over it.

Prints a markdown table (val loss at the selected step, whole-split val loss, step time, tokens/s, MFU against the
datasheet when the GPU is in bench.train_speed's table) and the race, and writes them to ``--out``. ``--steps``
shortens both runs (warmup and eval interval scale with it) for a smoke test on a CPU. Needs the tokenized Shakespeare
(``tokenizers/shakespeare-char``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lm.references import published


def _shorten(train, steps: int):
    """The run's train settings over `steps` steps: warmup and eval interval scaled alike."""
    scale = steps / train.max_steps
    return train.model_copy(
        update={
            "max_steps": steps,
            "warmup_steps": max(1, round(train.warmup_steps * scale)) if train.warmup_steps else 0,
            "eval_interval": max(1, round(train.eval_interval * scale)),
            "eval_batches": min(train.eval_batches, max(2, round(train.eval_batches * scale))),
        }
    )


def study(run_name: str, run, tok: Path, work: Path) -> dict:
    from bench.train_speed import val_loss
    from lm.config import EvaluateConfig
    from lm.evaluate import evaluate_run
    from lm.tokenizer import load_ids
    from lm.train_run import train_run

    val_ids, checkpoints = load_ids(tok, "val"), []

    def whole_split(model, row) -> None:
        """(step, seconds of training so far, whole-split val loss) at each of the loop's evaluations."""
        checkpoints.append((int(row["step"]), float(row["elapsed_s"]), val_loss(model, run.model, val_ids)))

    t0 = time.perf_counter()
    info = train_run(run_name, run, tok, work / "model", work / "curve.csv", progress=True, on_eval=whole_split)
    wall = time.perf_counter() - t0
    cfg = EvaluateConfig(num_passages=1, passage_chars=200)
    m = evaluate_run(
        run_name, work / "model", tok, cfg, work / "metrics.json", work / "samples.txt", work / "inside.safetensors"
    )
    return {
        "params": info["params"],
        "selected": info["selected_step"],
        "estimate": info["val_loss"],
        "val": m["val/loss"],
        "train_s": info["train_seconds"],
        "wall_s": wall,
        "tokens_per_s": info["tokens_per_s"],
        "device": info["device"],
        "sample": (work / "samples.txt").read_text()[:200],
        "checkpoints": checkpoints,
    }


def reference(run, tok: Path, device: str) -> dict:
    from bench import nanogpt
    from bench.train_speed import val_loss
    from lm.tokenizer import load_ids, load_stats

    train_ids, val_ids = load_ids(tok, "train"), load_ids(tok, "val")
    m, t = run.model, run.train  # the seed run's settings are nanoGPT's; a smaller run (a test) scales them down
    c = nanogpt.Config(
        vocab_size=int(load_stats(tok)["vocab_size"]), block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
        n_embd=m.n_embd, dropout=m.dropout, batch_size=t.batch_size, max_iters=t.max_steps, lr=t.lr, min_lr=t.min_lr,
        warmup_iters=t.warmup_steps, weight_decay=t.weight_decay, beta2=t.beta2, grad_clip=t.grad_clip,
        eval_interval=t.eval_interval, eval_iters=t.eval_batches,
    )  # fmt: skip
    r = nanogpt.train(c, train_ids, val_ids, device, compile=device.startswith("cuda"))
    return {
        "params": r["params"],
        "selected": r["best_step"],
        "estimate": r["best_estimate"],
        "val": val_loss(r["model"], run.model, val_ids),  # the windows and scorer the study's side is scored by
        "train_s": r["train_s"],
        "wall_s": r["train_s"],
        "tokens_per_s": r["tokens_per_s"],
        "device": device,
    }


def race(study_row: dict, ref_row: dict) -> list[str]:
    """The time-to-target lines: the study's training time to the first whole-split score at or under the reference's
    whole-split val loss (and the published one), and the ratio of the reference's training time to it."""
    ref = published("nanogpt-shakespeare-char-val")
    points = study_row["checkpoints"]
    lines = [f"Time to quality: the study's model scored on the whole val split at each of its {len(points)} "
             f"evaluations; the reference's clock is its training time, **{ref_row['train_s']:.1f} s** (evaluations "
             "excluded on both sides).", ""]  # fmt: skip
    targets = (("the reference's val loss on the day", ref_row["val"]), (f"published, {ref.cited}", ref.value))
    for name, target in targets:
        hit = next(((step, t) for step, t, loss in points if loss <= target), None)
        lines.append(f"- target {target:.4f} ({name}): " + (
            f"reached at step {hit[0]:,} after {hit[1]:.1f} s of training: **{ref_row['train_s'] / hit[1]:.2f}x**"
            if hit else f"not reached (best {min(c[2] for c in points):.4f})"))  # fmt: skip
    return [*lines, ""]


def table(rows: dict[str, dict], run, steps: int | None, gpu: str, fpt: float, sheet: dict | None) -> str:
    """The markdown of the rows so far: one per side, with MFU against the datasheet's bf16 peak where known."""
    lines = [
        f"### bench.gpu_check: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {gpu}, torch {torch.__version__}",
        "",
        f"{run.train.max_steps} steps of {run.train.batch_size} x {run.model.block_size} tokens, {run.train.dtype}"
        + (f" (shortened from the preset's: --steps {steps})" if steps else ""),
        "",
        "| | params | selected step | val estimate there | val loss, whole split | train s | tokens/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        mfu = f"{100 * r['tokens_per_s'] * fpt / sheet['bfloat16']:.1f}% of bf16" if sheet else "n/a"
        lines.append(
            f"| {name} | {r['params']:,} | {r['selected']:,} | {r['estimate']:.4f} | **{r['val']:.4f}** "
            f"| {r['train_s']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} |"
        )
    ref = published("nanogpt-shakespeare-char-val")
    lines += ["", f"Published ({ref.cited}): {ref.value:g}, the {ref.measures}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, default=Path("presets/sources.yaml"))
    p.add_argument("--run", default="shakespeare-gpt")
    p.add_argument("--tokenizer", type=Path, default=Path("tokenizers/shakespeare-char"))
    p.add_argument("--steps", type=int, help="train both for this many steps instead of the config's (smoke test)")
    p.add_argument("--no-reference", action="store_true", help="train the study's run only")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from bench.mfu import datasheet_peak, flops_per_token
    from lm.atomic import atomic_write_text
    from lm.config import load_params
    from lm.distributed import pick_device
    from lm.precision import resolve
    from lm.tokenizer import load_stats

    if not (args.tokenizer / "stats.json").exists():
        raise SystemExit(f"error: {args.tokenizer} not found: run `dvc repro tokenize@{args.tokenizer.name}` first")
    cfg = load_params(args.params)
    run = cfg.runs[args.run]
    if args.steps:
        run = run.model_copy(update={"train": _shorten(run.train, args.steps)})
    device = str(pick_device(run.train.device))
    dtype = resolve(run.train.dtype, device).dtype  # what the table names: the dtype the study's side trains in
    run = run.model_copy(update={"train": run.train.model_copy(update={"dtype": dtype})})
    torch.manual_seed(0)
    sheet = datasheet_peak(device)
    fpt = flops_per_token(run.model, int(load_stats(args.tokenizer)["vocab_size"]))
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    rows: dict[str, dict] = {}

    def report() -> None:
        """Print and write the rows so far: called after each side, so a run stopped during the reference (a
        device call's time limit) still leaves the study's row."""
        text = table(rows, run, args.steps, gpu, fpt, sheet)
        if len(rows) == 2:
            text += "\n" + "\n".join(race(*rows.values()))
        print(text)
        print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "sample"} for k, r in rows.items()}))
        if args.out:
            atomic_write_text(args.out, text + "\n")

    with tempfile.TemporaryDirectory() as work:
        rows[f"study ({args.run}, lm.train_run + lm.evaluate)"] = study(args.run, run, args.tokenizer, Path(work))
    report()
    if not args.no_reference:
        rows["reference (nanoGPT train_shakespeare_char, bench/nanogpt.py)"] = reference(run, args.tokenizer, device)
        report()


if __name__ == "__main__":
    main()
