"""Training throughput and MFU: ``python -m bench.train_speed [--run RUN | --reference | --race [--lever …] |
--levers | --ablation] [--write]``.

Figures, not tests: every number here is measured on the machine that runs it.

- **Peak**: a built-in GEMM probe (square matmuls, fp32 and bf16, best of several) gives the
  machine's measured matmul peak; on CUDA the device's datasheet peak is shown too. MFU is model
  FLOPs per second over that peak, with FLOPs per token = 6N + 12·n_layer·n_embd·ctx (PaLM,
  appendix B; `lm params` prints N).
- **Throughput** (``--run RUN``, or the reference model): the study's own training loop
  (`lm.trainer.fit`) for ``--warmup`` + ``--steps`` steps; ms/step is the median over the steps
  after warm-up, tokens/s = batch tokens / median step, peak RSS is that of a fresh process per
  configuration, and the first step's excess over the median is reported as compile/warm-up time.
- **Reference** (``--reference``): nanoGPT's CPU example (GPT 4 layers, 4 heads, n_embd 128, block
  64, batch 12, dropout 0, AdamW lr 1e-3, 2000 iterations, cosine to 1e-4, warmup 100, fp32, eager)
  implemented plainly below as the baseline, against the study's fastest path on the identical
  model class and data (`lm.trainer.fit` with the ``--study-run``'s train settings, bf16 autocast,
  at ``--batch-size`` 32 and ``--warmup-steps`` 50, the best measured for a budget this short).
  Both are first timed, then each trains in a fresh process for the same wall-clock (the
  reference's 2000 iterations) and is scored on the whole val split by the study's one evaluation
  path (`lm.metrics.score`).
- **Race to quality** (``--race``): the reference's mean whole-split val loss over ``--seeds`` seeds is the target
  and its mean training time the clock; each contestant (the study's path, and that path with the changes of
  `RACE_LEVERS`: Muon or AdamW, LLaMA's block, an lr schedule over elapsed time, batch and window warm-ups) is scored
  on the whole val split every ``--checkpoint`` steps, and the ratio is the clock over its training time to the first
  score at or under the target (evaluations excluded on both sides).
- **Ablation** (``--ablation``): tokens/s of each run of ``report.ablation`` (GPT-2's block to
  LLaMA's, one change per row), the wall-clock column the report leaves out.
- **Levers** (``--levers``): each training option on the reference model, one at a time and
  combined: bf16 autocast (with its val loss against fp32 after the same steps), torch.compile,
  the AdamW kernels, threads, batch size.

Needs the tokenized Shakespeare (``dvc repro tokenize@shakespeare-char``). Prints markdown tables;
``--write`` appends them, with the machine and versions, to reports/bench.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from bench import append_to_bench
from bench.mfu import Peaks, flops_per_token, machine
from lm.config import TrainConfig
from lm.families import GPTConfig

REFERENCE_MODEL = GPTConfig(family="gpt", block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
REFERENCE_TRAIN = TrainConfig(
    max_steps=2000,
    batch_size=12,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
    device="cpu",
)
"""nanoGPT config/train_shakespeare_char.py with the README's CPU overrides."""
T = TypeVar("T")
RACE_WINDOW = (0.95, 1.02)
"""The race accepts a study run that took 95-102% of the reference's time (which itself varies
more than that between runs)."""

# ----------------------------------------------------------------------------------------------
# data


def load_tokens(tok_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    from lm.tokenizer import load_ids, load_stats

    if not (tok_dir / "stats.json").exists():
        raise SystemExit(f"error: {tok_dir} not found: run `dvc repro tokenize@{tok_dir.name}` first")
    return load_ids(tok_dir, "train"), load_ids(tok_dir, "val"), int(load_stats(tok_dir)["vocab_size"])


def val_loss(model: torch.nn.Module, model_cfg, val_ids: np.ndarray) -> float:
    """Mean NLL over the whole val split, by the study's one evaluation path."""
    from lm import batches as B
    from lm.metrics import score

    device = next(model.parameters()).device
    total, count = score(model, B.for_model(model_cfg, val_ids, "text", None).iterate(256), device)
    return total / count


# ----------------------------------------------------------------------------------------------
# the plain reference: nanoGPT's loop, fp32, eager, standard AdamW


def reference_lr(it: int, cfg: TrainConfig) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at max_steps."""
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / (cfg.warmup_steps + 1)
    ratio = (it - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def reference_train(model_cfg, cfg: TrainConfig, train_ids: np.ndarray, vocab_size: int, iters: int):
    """nanoGPT train.py on CPU, plainly: random windows (torch.randint), fp32, eager, per-parameter
    AdamW (foreach off), decay on 2-D weights, clip 1.0. Returns (model, per-step seconds)."""
    from lm.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        foreach=False,
    )
    data = torch.from_numpy(train_ids.astype(np.int64))
    T, B = model_cfg.block_size, cfg.batch_size
    times = []
    model.train()
    for it in range(iters):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = reference_lr(it, cfg)
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return model.eval(), times


# ----------------------------------------------------------------------------------------------
# the study's path


def study_train(model_cfg, cfg: TrainConfig, train_ids: np.ndarray, val_ids: np.ndarray, vocab: int, on_eval=None):
    """`lm.trainer.fit` exactly as the train stage runs it (text windows, fixed val subset). ``on_eval(model, row)``
    is called at each of fit's evaluations (every ``cfg.eval_interval`` steps)."""
    from lm import batches as B
    from lm.distributed import pick_device
    from lm.models import build_model
    from lm.trainer import fit

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, vocab)
    tr, va = B.for_model(model_cfg, train_ids, "text", None), B.for_model(model_cfg, val_ids, "text", None)
    hook = (lambda row: on_eval(model, row)) if on_eval else None
    result = fit(model, tr, va, cfg, device=pick_device(cfg.device), progress=False, on_eval=hook)  # cuda first
    return model, result


class _Reached(Exception):
    """A race contestant's whole-split val loss reached the target: its time to target is known, so it stops."""


def _worker(
    q, kind: str, model_cfg, cfg: TrainConfig, tok_dir: str, iters: int, vocab: int, score: bool, every: int,
    stop_at: float | None = None,
) -> None:  # fmt: skip
    """One configuration in a fresh process (clean peak RSS, thread settings and compile caches): per-step seconds,
    peak RSS, tokens seen, with `score` the val loss on the whole split, and with `every` (the study's path) the
    whole-split val loss every `every` steps, as (step, seconds of training so far, loss), stopping at the first at or
    under `stop_at` if given."""
    train_ids, val_ids, _ = load_tokens(Path(tok_dir))
    checkpoints: list[tuple[int, float, float]] = []
    if kind == "reference":
        model, times = reference_train(model_cfg, cfg, train_ids, vocab, iters)
        tokens = iters * cfg.batch_size * model_cfg.block_size
    else:
        interval = every or iters + 1
        update = {"max_steps": iters, "warmup_steps": min(cfg.warmup_steps, iters), "eval_interval": interval}
        cfg = cfg.model_copy(update=update | ({"eval_batches": 1} if every else {}))  # fit's own val subset: tiny

        def on_eval(model, row):
            checkpoints.append((int(row["step"]), float(row["elapsed_s"]), val_loss(model, model_cfg, val_ids)))
            if stop_at is not None and checkpoints[-1][2] <= stop_at:
                raise _Reached

        try:
            model, result = study_train(model_cfg, cfg, train_ids, val_ids, vocab, on_eval if every else None)
            times, tokens = result.step_seconds, result.tokens
        except _Reached:
            q.put(([], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0, None, checkpoints))
            return
    loss = val_loss(model, model_cfg, val_ids) if score else None
    q.put((times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, tokens, loss, checkpoints))


def in_fresh_process(
    kind: str, model_cfg, cfg: TrainConfig, tok_dir: Path, vocab: int, iters: int, score: bool = False, every: int = 0,
    stop_at: float | None = None,
) -> tuple[list[float], float, int, float | None, list[tuple[int, float, float]]]:  # fmt: skip
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (q, kind, model_cfg, cfg, str(tok_dir), iters, vocab, score, every, stop_at)
    p = ctx.Process(target=_worker, args=args)
    p.start()
    out = q.get()
    p.join()
    return out


def measure(kind: str, model_cfg, cfg: TrainConfig, tok_dir: Path, vocab: int, warmup: int, steps: int) -> dict:
    times, rss_mb, *_ = in_fresh_process(kind, model_cfg, cfg, tok_dir, vocab, warmup + steps)
    median = statistics.median(times[warmup:])
    return {
        "ms_step": 1e3 * median,
        "tokens_per_s": cfg.batch_size * model_cfg.block_size / median,
        "first_step_s": times[0],
        "warmup_s": sum(times[:warmup]) - warmup * median,
        "rss_mb": rss_mb,
    }


def resolved(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with ``dtype: auto`` made concrete for this machine, as the train stage does (lm.precision)."""
    from lm.distributed import pick_device
    from lm.precision import resolve

    return cfg.model_copy(update={"dtype": resolve(cfg.dtype, pick_device(cfg.device)).dtype})


def fit_to_budget(
    train: Callable[[int], tuple[float, T]],
    budget: float,
    guess: float,
    window: tuple[float, float] = RACE_WINDOW,
    tries: int = 4,
) -> tuple[int, float, T]:
    """The most steps whose run fits `budget` seconds: `train(steps)` returns (seconds spent,
    result). Starts from `guess` steps and rescales by budget/spent until a run lands inside
    `window` (fractions of the budget). Returns (steps, seconds, result) of the accepted run, else of
    the longest run that stayed under the window's top, else of the last run."""
    steps, best, last = max(1, int(guess)), None, None
    for _ in range(tries):
        spent, result = train(steps)
        last = (steps, spent, result)
        if spent <= window[1] * budget and (best is None or steps > best[0]):
            best = last
        if window[0] * budget <= spent <= window[1] * budget:
            return last
        # Aim just under the budget: a slow phase mid-run costs more than a few steps.
        steps = max(1, int(steps * budget / spent * 0.99))
        if best is not None and steps <= best[0]:
            return best  # a shorter run than one already inside the budget cannot do better
    return best or last


# ----------------------------------------------------------------------------------------------
# tables


def row(name: str, m: dict, fpt: int, peak: float, dtype: str) -> dict:
    mfu = m["tokens_per_s"] * fpt / peak
    return {
        "config": name,
        "ms/step": f"{m['ms_step']:.1f}",
        "tokens/s": f"{m['tokens_per_s']:,.0f}",
        "MFU": f"{100 * mfu:.2f}% of {dtype} {peak / 1e9:,.0f} GFLOP/s",
        "warm-up/compile s": f"{m['warmup_s']:.1f}",
        "peak RSS MB": f"{m['rss_mb']:,.0f}",
    }


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def ablation(study, args: argparse.Namespace) -> str:
    """The report's ablation rows with their measured training throughput (each in a fresh process, median step
    after warm-up) and the change in tokens/s against the row above."""
    import json

    lines = [
        "| run | params | val loss | val bpc | ms/step | tokens/s | Δ tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    prev = None
    for name in study.report.ablation:
        run = study.runs[name]
        tok = args.tokenizer or Path("tokenizers") / run.tokenizer
        _, _, vocab = load_tokens(tok)
        m = measure("study", run.model, resolved(run.train), tok, vocab, args.warmup, args.steps)
        path = Path("metrics") / f"{name}.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        loss, bpc = (f"{metrics[k]:.4f}" if k in metrics else "" for k in ("val/loss", "val/bpc"))
        delta = "" if prev is None else f"{m['tokens_per_s'] / prev - 1:+.1%}"
        params = f"{metrics['params']:,}" if "params" in metrics else ""
        lines.append(
            f"| {name} | {params} | {loss} | {bpc} | {m['ms_step']:.1f} | {m['tokens_per_s']:,.0f} | {delta} |"
        )
        prev = m["tokens_per_s"]
    return "\n".join(lines)


LEVERS: dict[str, dict] = {
    "fp32 eager, AdamW foreach (study default)": {},
    "AdamW for-loop": {"adamw_impl": "for-loop"},
    "AdamW fused": {"adamw_impl": "fused"},
    "bf16 autocast": {"dtype": "bfloat16"},
    "torch.compile": {"compile": True},
    "torch.compile + bf16": {"compile": True, "dtype": "bfloat16"},
    "1 thread": {"threads": 1},
    "batch 32": {"batch_size": 32},
    "batch 32, bf16 (--reference study path)": {"batch_size": 32, "dtype": "bfloat16"},
    "batch 64": {"batch_size": 64},
    "batch 64, bf16": {"batch_size": 64, "dtype": "bfloat16"},
    "batch 64, bf16, compile": {"batch_size": 64, "dtype": "bfloat16", "compile": True},
    "batch 128": {"batch_size": 128},
    "batch 128, bf16": {"batch_size": 128, "dtype": "bfloat16"},
}


# ----------------------------------------------------------------------------------------------
# the modes


def time_run(study, args: argparse.Namespace, peaks: Peaks) -> list[str]:
    """``--run RUN``: the run's own model and train settings, timed."""
    name = args.run or args.study_run
    if name not in study.runs:
        raise SystemExit(f"error: unknown run {name!r}; {args.params} defines: {', '.join(study.runs)}")
    run = study.runs[name]
    tok = args.tokenizer or Path("tokenizers") / run.tokenizer
    _, _, vocab = load_tokens(tok)
    cfg = resolved(run.train)
    m = measure("study", run.model, cfg, tok, vocab, args.warmup, args.steps)
    return [markdown([row(name, m, flops_per_token(run.model, vocab), *peaks.for_run(cfg))])]


def levers(args: argparse.Namespace, peaks: Peaks) -> list[str]:
    """``--levers``: each training option on the reference model, then bf16 against fp32 after the same steps."""
    tok = args.tokenizer or Path("tokenizers/shakespeare-char")
    _, _, vocab = load_tokens(tok)
    fpt = flops_per_token(REFERENCE_MODEL, vocab)
    rows, skipped = [], []
    for label, change in LEVERS.items():
        cfg = REFERENCE_TRAIN.model_copy(update=change)
        if cfg.dtype == "bfloat16" and not peaks.bf16_native:
            skipped.append(label)  # minutes of a scalar fallback, measuring nothing a user would choose
            continue
        warm = args.warmup + (20 if cfg.compile else 0)
        m = measure("study", REFERENCE_MODEL, cfg, tok, vocab, warm, args.steps)
        rows.append(row(label, m, fpt, *peaks.for_run(cfg)))
        print(markdown(rows[-1:]), flush=True)
    out = [
        f"Levers on the reference model (4L/4H/128, ctx 64, batch 12 unless stated), "
        f"{args.warmup} warm-up + {args.steps} timed steps each:",
        "",
        markdown(rows),
        "",
    ]
    if skipped:
        return out + [f"Not measured, bf16 being unavailable here: {'; '.join(skipped)}.", ""]
    # bf16 must not cost accuracy: the same 300 steps in fp32 and bf16, scored on the whole val split.
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = REFERENCE_TRAIN.model_copy(update={"dtype": dtype})
        losses[dtype] = in_fresh_process("study", REFERENCE_MODEL, cfg, tok, vocab, 300, score=True)[3]
    return out + [
        f"bf16 autocast vs fp32 after the same 300 steps: val loss {losses['bfloat16']:.4f} vs "
        f"{losses['float32']:.4f} (difference {losses['bfloat16'] - losses['float32']:+.4f}; limit 0.02)",
        "",
    ]


def race_throughput(study, args: argparse.Namespace, peaks: Peaks) -> tuple[list[str], TrainConfig, dict]:
    """``--reference``, first half: the reference and the study's path timed on the identical model; returns the
    table, the study's train settings and its timing."""
    tok = args.tokenizer or Path("tokenizers/shakespeare-char")
    _, _, vocab = load_tokens(tok)
    fpt = flops_per_token(REFERENCE_MODEL, vocab)
    fast = resolved(
        study.runs[args.study_run].train.model_copy(
            update={"device": "cpu", "batch_size": args.batch_size, "warmup_steps": args.warmup_steps}
        )
    )
    ref_m = measure("reference", REFERENCE_MODEL, REFERENCE_TRAIN, tok, vocab, args.warmup, args.steps)
    fast_m = measure("study", REFERENCE_MODEL, fast, tok, vocab, args.warmup + (20 if fast.compile else 0), args.steps)
    rows = [
        row("reference: nanoGPT CPU, fp32 eager, plain AdamW, batch 12", ref_m, fpt, *peaks.for_run(REFERENCE_TRAIN)),
        row(f"study: {args.study_run} train settings with {_describe(fast)}", fast_m, fpt, *peaks.for_run(fast)),
    ]
    ratio = fast_m["tokens_per_s"] / ref_m["tokens_per_s"]
    return [markdown(rows), "", f"**Throughput ratio: {ratio:.2f}x** tokens/s (target >= 1.5x).", ""], fast, fast_m


def race_equal_time(args: argparse.Namespace, fast: TrainConfig, fast_m: dict) -> list[str]:
    """``--reference``, second half: the reference's full run sets the wall-clock; the study trains for the same
    time (each contestant in a fresh process, as when timed) and both are scored on the whole val split."""
    tok = args.tokenizer or Path("tokenizers/shakespeare-char")
    _, _, vocab = load_tokens(tok)
    ref_times, _, ref_tokens, ref_loss, _ = in_fresh_process(
        "reference", REFERENCE_MODEL, REFERENCE_TRAIN, tok, vocab, args.iters, score=True
    )
    budget = sum(ref_times)

    def study_run(n: int) -> tuple[float, tuple[int, float]]:
        times, _, tokens, loss, _ = in_fresh_process("study", REFERENCE_MODEL, fast, tok, vocab, n, score=True)
        print(f"study: {n} steps took {sum(times):.1f} s of the reference's {budget:.1f} s", flush=True)
        return sum(times), (tokens, loss)

    # The LR schedule needs the step count up front: predicted from the timed steps, then
    # corrected by re-training when the run misses the budget (this machine's speed drifts).
    guess = (budget - fast_m["warmup_s"]) / (fast_m["ms_step"] / 1e3)
    steps, spent, (tokens, fast_loss) = fit_to_budget(study_run, budget, guess)
    race = [
        {"config": "reference", "steps": args.iters, "tokens": f"{ref_tokens:,}", "train s": f"{budget:.1f}",
         "val loss (whole split)": f"{ref_loss:.4f}"},
        {"config": f"study ({_describe(fast)})", "steps": steps, "tokens": f"{tokens:,}", "train s": f"{spent:.1f}",
         "val loss (whole split)": f"{fast_loss:.4f}"},
    ]  # fmt: skip
    return [
        f"Same wall-clock as the reference's {args.iters} iterations:",
        "",
        markdown(race),
        "",
        f"**val loss {fast_loss - ref_loss:+.4f} nats** against the reference (target <= -0.15)."
        + _race_caveat(spent / budget),
        "",
    ]


LLAMA_BLOCK = {"pos": "rope", "norm_class": "rmsnorm", "mlp": "swiglu", "n_hidden": 341, "bias": False}
"""The study's ablation choices at the race's size: rotary positions, RMSNorm, SwiGLU, no biases; SwiGLU's hidden
width 341 = 2/3 of 4·128 keeps the reference's parameter count within 2 %."""
BATCH_WARMUP = {"batch_warmup": {"start": 8, "steps": 100}}
SEQ_WARMUP = {"seq_warmup": {"start": 16, "steps": 100}}
TIME_BUDGET = {"time_budget_s": "share"}
"""Stands for a schedule over ``--budget-share`` of the reference's measured clock (set once the reference ran)."""

RACE_LEVERS: dict[str, tuple[dict, dict]] = {
    # name: (changes to the reference's model, changes to the study path's train settings)
    "study": ({}, {}),
    "adamw": ({}, {"optimizer": "adamw"}),
    "fp32": ({}, {"dtype": "float32"}),
    "600-steps": ({}, {"max_steps": 600}),
    "llama-block": (LLAMA_BLOCK, {}),
    "time-budget": ({}, TIME_BUDGET),
    "batch-warmup": ({}, BATCH_WARMUP),
    "seq-warmup": ({}, SEQ_WARMUP),
    "warmups": ({}, BATCH_WARMUP | SEQ_WARMUP),
    "llama-warmups": (LLAMA_BLOCK, BATCH_WARMUP | SEQ_WARMUP),
    "together": (LLAMA_BLOCK, TIME_BUDGET | BATCH_WARMUP | SEQ_WARMUP),
}
"""``--race`` contestants on the study's side: its path as configured, then one change each (``--lever``), then
changes combined ('together': all of them); a ``max_steps`` change replaces ``--race-steps`` (a shorter schedule
decays its learning rate sooner), and a time budget makes ``--race-steps`` a ceiling."""


def race(study, args: argparse.Namespace) -> list[str]:
    """``--race``: the reference's whole-split val loss after its iterations is the target and its training time the
    clock; each study contestant trains ``--race-steps`` steps, is scored on the whole val split every
    ``--checkpoint`` steps, and its time to target is its training time (evaluations excluded, on both sides) up to
    the first checkpoint at or under the target. Every side runs ``--seeds`` seeds, each in a fresh process."""
    from lm.memory import count_params

    tok = args.tokenizer or Path("tokenizers/shakespeare-char")
    _, _, vocab = load_tokens(tok)
    seeds = [REFERENCE_TRAIN.seed + i for i in range(args.seeds)]
    refs = []
    for seed in seeds:
        times, _, _, loss, _ = in_fresh_process("reference", REFERENCE_MODEL, REFERENCE_TRAIN.model_copy(
            update={"seed": seed}), tok, vocab, args.iters, score=True)  # fmt: skip
        refs.append((sum(times), loss))
        print(f"reference seed {seed}: {loss:.4f} in {sum(times):.1f} s", flush=True)
    ref_time, target = statistics.mean(t for t, _ in refs), statistics.mean(v for _, v in refs)
    n_ref = count_params(REFERENCE_MODEL, vocab)
    rows = [{"contestant": "reference (nanoGPT CPU, fp32, AdamW, batch 12)", "params": f"{n_ref:,}", "seed": seed,
             "steps": args.iters, "train s": f"{t:.1f}", "val loss at the end": f"{v:.4f}",
             "time to target s": f"{t:.1f}", "ratio": ""} for seed, (t, v) in zip(seeds, refs)]  # fmt: skip
    summary = []
    for lever in args.lever:
        ratios = _race_contestant(study, args, lever, seeds, (tok, vocab, n_ref), (ref_time, target), rows)
        summary.append(f"- **{lever}: {statistics.median(ratios):.2f}x** (seeds: "
                       + ", ".join(f"{r:.2f}x" for r in ratios) + ")")  # fmt: skip
    sd = statistics.stdev(v for _, v in refs) if len(refs) > 1 else 0.0
    return [
        f"Time to the reference's quality: target = the reference's mean whole-split val loss after {args.iters} "
        f"iterations, **{target:.4f}** (sd {sd:.4f} over {len(seeds)} seeds), clock = its mean training time "
        f"**{ref_time:.1f} s**; each study contestant is scored on the whole val split every {args.checkpoint} "
        "steps, evaluation time excluded on both sides"
        + (", to its last step." if args.full else ", and stops at the first score at or under the target."),
        "",
        markdown(rows),
        "",
        "Time-to-target ratio (reference time / the contestant's time to reach the target; median, then each seed):",
        "",
        *summary,
        "",
    ]


def _race_contestant(study, args, lever: str, seeds: list[int], data: tuple, ref: tuple, rows: list) -> list[float]:
    """One ``--race`` contestant over the seeds: appends its rows, returns its time-to-target ratios (0 where the
    target was not reached)."""
    from lm.memory import count_params

    (tok, vocab, n_ref), (ref_time, target) = data, ref
    model_change, train_change = RACE_LEVERS[lever]
    if "time_budget_s" in train_change:
        train_change = train_change | {"time_budget_s": args.budget_share * ref_time}
    model_cfg = REFERENCE_MODEL.model_copy(update=model_change)
    settings = {"device": "cpu", "batch_size": args.batch_size, "warmup_steps": args.warmup_steps} | train_change
    base = TrainConfig.model_validate(study.runs[args.study_run].train.model_dump() | settings)
    n = count_params(model_cfg, vocab)
    if abs(n / n_ref - 1) > 0.02:
        raise SystemExit(f"error: lever {lever!r} has {n:,} parameters, beyond 2 % of the reference's {n_ref:,}")
    ratios, steps = [], train_change.get("max_steps", args.race_steps)
    for seed in seeds:
        cfg = resolved(base.model_copy(update={"seed": seed}))
        *_, points = in_fresh_process("study", model_cfg, cfg, tok, vocab, steps, every=args.checkpoint,
                                      stop_at=None if args.full else target)  # fmt: skip
        hit = next(((step, t) for step, t, loss in points if loss <= target), None)
        ratios.append(ref_time / hit[1] if hit else 0.0)
        print(f"{lever} seed {seed}: " + (f"target at step {hit[0]}, {hit[1]:.1f} s" if hit else "target not reached"),
              flush=True)  # fmt: skip
        rows.append({"contestant": f"{lever}: {_describe(cfg)}", "params": f"{n:,}", "seed": seed,
                     "steps": points[-1][0], "train s": f"{points[-1][1]:.1f}",
                     "val loss at the end": f"{points[-1][2]:.4f}",
                     "time to target s": f"{hit[1]:.1f} (step {hit[0]})" if hit else "not reached",
                     "ratio": f"{ratios[-1]:.2f}x" if hit else "-"})  # fmt: skip
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--run", help="time this run of params.yaml (its model and train settings)")
    what.add_argument("--reference", action="store_true", help="nanoGPT's CPU config, plain, against the study's path")
    what.add_argument("--levers", action="store_true", help="each training option on the reference model")
    what.add_argument("--race", action="store_true", help="time to the reference's final val loss, over seeds")
    what.add_argument(
        "--ablation",
        action="store_true",
        help="tokens/s of every run of params.yaml's report.ablation, beside its params and val numbers "
        "(metrics/RUN.json): the throughput column of the report's 'What each change buys'",
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument(
        "--study-run",
        default="shakespeare-gpt",
        help="--reference: the run whose train settings are the study's path (default: shakespeare-gpt)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="--reference: the study path's batch (default 32: the best of those measured for a budget this short; "
        "docs/performance.md)",
    )
    p.add_argument("--warmup-steps", type=int, default=50, help="--reference: the study path's LR warmup (default 50)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the run's, or tokenizers/shakespeare-char)")
    p.add_argument("--warmup", type=int, default=10, help="steps before timing (compile happens here)")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument(
        "--iters", type=int, default=2000, help="--reference: the reference's iterations for the equal-time race"
    )
    p.add_argument("--seeds", type=int, default=3, help="--race: seeds of each side (default 3)")
    p.add_argument("--race-steps", type=int, default=1000, help="--race: the study contestants' steps (default 1000)")
    p.add_argument("--checkpoint", type=int, default=50, help="--race: steps between whole-split scores (default 50)")
    p.add_argument("--lever", nargs="+", default=["study"], choices=list(RACE_LEVERS), help="--race: contestants")
    p.add_argument(
        "--budget-share",
        type=float,
        default=0.3,
        help="--race: a time-budget contestant's budget, as a share of the reference's clock (default 0.3)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="--race: train every contestant to its last step (default: stop once the target is reached)",
    )
    p.add_argument("--write", action="store_true", help="append the tables to reports/bench.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lm.config import load_params

    study = load_params(args.params)
    peaks = Peaks.measure("cuda" if torch.cuda.is_available() else "cpu")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    out = [f"### bench.train_speed {command}", f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {machine()}", ""]
    out += peaks.lines()
    if args.ablation:
        out += [ablation(study, args), ""]
    elif args.levers:
        out += levers(args, peaks)
    elif args.race:
        out += race(study, args)
    elif args.reference:
        table, fast, fast_m = race_throughput(study, args, peaks)
        out += table
        print("\n".join(out), flush=True)
        out += race_equal_time(args, fast, fast_m)
    else:
        out += time_run(study, args, peaks)
    text = "\n".join(out)
    print(text)
    if args.write:
        print(f"appended to {append_to_bench(text)}")


def _race_caveat(share: float) -> str:
    """What the reader must know when the study's accepted run missed the window of the budget."""
    if share < RACE_WINDOW[0]:
        return (
            f" The study trained for only {100 * share:.0f}% of the reference's time (the machine's speed "
            "drifted between runs): a handicap, so the gap is if anything understated."
        )
    if share > RACE_WINDOW[1]:
        return (
            f" The study overshot: it trained for {100 * share:.0f}% of the reference's time (the machine's "
            "speed drifted between runs), so the gap is overstated; run again on a quieter machine."
        )
    return ""


def _describe(cfg: TrainConfig) -> str:
    parts = [
        f"batch {cfg.batch_size}",
        f"lr {cfg.lr:g}",
        f"warmup {cfg.warmup_steps}",
        cfg.dtype,
        f"Muon + AdamW {cfg.adamw_impl}" if cfg.optimizer == "muon" else f"{cfg.optimizer} {cfg.adamw_impl}",
    ]
    if cfg.time_budget_s:
        parts.append(f"lr over {cfg.time_budget_s:.1f} s")
    for name, w in (("batch", cfg.batch_warmup), ("window", cfg.seq_warmup)):
        if w:
            parts.append(f"{name} {w.start}+ over {w.steps} steps")
    if cfg.compile is True:
        parts.append("compiled")
    if cfg.threads:
        parts.append(f"{cfg.threads} threads")
    return ", ".join(parts)


if __name__ == "__main__":
    main()
