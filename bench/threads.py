"""Training steps when the machine is not idle: ``python -m bench.threads [--runs names-gpt shakespeare-gpt]
[--settings ...] [--write]``.

torch runs its intra-op work on OpenMP threads (GNU libgomp in the pip wheels), one per core by default, and those
threads spin at every barrier before they sleep. A training step has hundreds of barriers; when anything else runs
on the machine, one of the threads is descheduled and its twin spins away its time slice waiting for it. This
benchmark measures that, per run of the params file, for each **setting** (how OpenMP waits and how many threads)
under each **load**:

- ``alone``: the machine otherwise quiet;
- ``busy``: beside one single-threaded busy loop (a browser tab, a compile, ``make test`` beside ``make repro``);
- ``twin``: two identical trainings at once, each timed (two ``dvc queue`` workers, bench.seeds in parallel).

Settings are environment variables for a fresh process, read by libgomp when torch loads it: ``spin`` is libgomp's
default (300,000 spins before sleeping: what ``lm`` ran with before lm/threads.py), ``passive`` is
``OMP_WAIT_POLICY=PASSIVE`` (sleep at once), ``spinN`` is ``GOMP_SPINCOUNT=N``, ``1thread`` is
``OMP_NUM_THREADS=1``, ``lm`` is what ``lm`` chooses by itself (lm/threads.py). Every other OpenMP variable is
removed first. The step is the train stage's: the run's model, optimizer and dtype on this machine (``auto``
resolved), a batch of the run's size drawn from random token ids (speed does not depend on the text). ms/step is the
median of the timed steps; each process times at most ``--steps`` steps or ``--seconds`` seconds, whichever ends
first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from bench import append_to_bench

SETTINGS = {
    "spin": {"GOMP_SPINCOUNT": "300000"},  # libgomp's own default, written out so lm leaves it
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin3k": {"GOMP_SPINCOUNT": "3000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "spin300": {"GOMP_SPINCOUNT": "300"},
    "spin100": {"GOMP_SPINCOUNT": "100"},
    "1thread": {"OMP_NUM_THREADS": "1"},
    "lm": {},  # nothing set: lm/threads.py chooses
}
"""Environment for each setting; every OpenMP variable is removed from the child's environment first."""
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_PROC_BIND", "KMP_BLOCKTIME")
LOADS = ("alone", "busy", "twin")
BUSY_LOOP = "while True: pass"


def worker(run_name: str, params: str, steps: int, seconds: float, warmup: int) -> dict:
    """One process: the run's training step, timed. lm is imported first, as the stages and ``lm`` do."""
    from lm.config import load_params  # isort: skip  (lm/threads.py sets OpenMP's environment before torch loads)

    import numpy as np
    import torch

    from lm.metrics import autocast
    from lm.models import build_model
    from lm.precision import resolve
    from lm.trainer import make_optimizer

    run = load_params(params).runs[run_name]
    cfg = run.train.model_copy(update={"dtype": resolve(run.train.dtype, torch.device("cpu")).dtype})
    vocab = 65 if run.tokenizer.endswith("char") else 2048
    torch.manual_seed(0)
    model = build_model(run.model, vocab).train()
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    bs, ctx = cfg.batch_size, run.model.block_size
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < warmup + steps and (len(times) < warmup + 5 or time.perf_counter() - start < seconds):
        x = torch.from_numpy(rng.integers(0, vocab, (bs, ctx + 1)))
        t0 = time.perf_counter()
        with autocast("cpu", cfg.dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return {"ms": 1e3 * statistics.median(timed), "steps": len(timed), "threads": torch.get_num_threads(),
            "dtype": cfg.dtype}  # fmt: skip


def child_env(setting: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in OMP_VARS} | SETTINGS[setting]


def spawn(run: str, setting: str, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.threads", "--worker", run, "--params", args.params, "--steps", str(args.steps),
           "--seconds", str(args.seconds)]  # fmt: skip
    return subprocess.Popen(cmd, env=child_env(setting), stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"error: a worker failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def measure(run: str, setting: str, load: str, args: argparse.Namespace) -> list[dict]:
    """ms/step of each timed training under ``load`` (two results for ``twin``)."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if load == "busy" else None
    try:
        procs = [spawn(run, setting, args) for _ in range(2 if load == "twin" else 1)]
        return [result(p) for p in procs]
    finally:
        if busy:
            busy.kill()
            busy.wait()


def table(run: str, rows: dict[str, dict[str, list[dict]]]) -> str:
    """One run's table: the median over repeats (and processes, for two at once) of each process's median step, and
    the slowest process of two at once (a collapse shows there first)."""
    med = {k: {load: statistics.median(r["ms"] for r in v) for load, v in by.items()} for k, by in rows.items()}
    base = med.get("spin", {}).get("alone")
    lines = [f"**{run}** ({next(iter(rows.values()))['alone'][0]['dtype']}), ms/step:", "",
             "| setting | threads | alone | beside a busy loop | two at once (each) | slowest of two at once "
             "| two at once / this alone |" + (" two at once / default alone |" if base else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if base else "")]  # fmt: skip
    for setting, m in med.items():
        worst = max(r["ms"] for r in rows[setting]["twin"])
        cells = [f"{m[load]:,.0f}" for load in LOADS] + [f"{worst:,.0f}", f"{m['twin'] / m['alone']:.1f}x"]
        cells += [f"{m['twin'] / base:.1f}x"] if base else []
        lines.append(f"| {setting} | {rows[setting]['alone'][0]['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["names-gpt", "shakespeare-gpt"], help="runs of the params file")
    p.add_argument("--settings", nargs="+", default=["spin", "lm", "passive", "1thread"], choices=list(SETTINGS),
                   help="ways to wait (default: libgomp's, lm's, passive, 1 thread; spinN: other counts)")  # fmt: skip
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--steps", type=int, default=40, help="timed steps per process, at most")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per process, at most")
    p.add_argument("--repeats", type=int, default=3, help="processes per setting and load (their median is shown)")
    p.add_argument("--write", action="store_true", help="append the tables to reports/bench.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.params, args.steps, args.seconds, 5)))
        return
    from lm.machine import describe  # torch in this parent only: each setting's process loads its own

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = f"{platform.machine()}, {os.cpu_count()} cores, {describe()['cpu']}"
    head = [f"### bench.threads, {when}", "", f"{cpu}; at most "
            f"{args.steps} steps or {args.seconds:.0f} s timed per process, after 5 warm-up steps; each cell the "
            f"median over {args.repeats} repeats (both processes, for two at once) of a process's median step.",
            ""]  # fmt: skip
    out = []
    for run in args.runs:
        rows = {}
        for setting in args.settings:
            rows[setting] = {load: [r for _ in range(args.repeats) for r in measure(run, setting, load, args)]
                             for load in LOADS}  # fmt: skip
            seen = ", ".join(f"{k} {[round(r['ms']) for r in v]}" for k, v in rows[setting].items())
            print(f"{run} {setting}: {seen}", file=sys.stderr, flush=True)
        out.append(table(run, rows))
    text = "\n".join(head) + "\n" + "\n\n".join(out) + "\n"
    print(text)
    if args.write:
        print(f"appended to {append_to_bench(text)}")


if __name__ == "__main__":
    main()
