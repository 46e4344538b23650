"""What bf16 autocast moves, run by run: ``python -m bench.dtypes [RUN ...] [--threads N] [--jobs J] [--params FILE]
[--tokenizers DIR] [--metrics DIR] [--out FILE.md]``.

The runs with ``train.dtype: auto`` train in bf16 where the CPU multiplies bf16 natively and in fp32 elsewhere
(lm/precision.py), so the same params give numbers that differ by more than kernel noise on two kinds of machine.
This trains each such run (or each RUN named) both ways, with the run's own seed, through the train stage's
library call and the evaluate stage's (`bench.seeds.train_and_score`), in temporary folders (the committed
outputs are not touched), and prints per run the whole-split val loss and bpc in each dtype and their difference,
beside the committed number and the dtype it came from (metrics/RUN.json). `lm verify` reads the table's JSON
twin (``--out`` writes FILE.md and FILE.json) for the tolerance of a run whose dtype resolved differently.

Training both ways needs native bf16 (on a CPU without it, bf16 is ~100x slower: the script refuses). With the
default ``--threads 0`` (torch's default, as the pipeline runs) and one job at a time, the bf16 side repeats the
pipeline's run, so its number equals the committed one on the machine that made the commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.seeds import run_problems, train_and_score
from lm.atomic import atomic_write_text, write_json

DTYPES = ("bfloat16", "float32")


def table(results: list[dict], runs: list[str], committed: dict[str, dict], threads: int) -> str:
    """The markdown: one row per run, bf16 and fp32 val loss and bpc, the difference, the committed number."""
    by = {(r["run"], r["dtype"]): r for r in results}
    lines = [
        f"### bench.dtypes: {dt.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {threads or torch.get_num_threads()} threads a run",
        "",
        "Whole-split val loss (nats/token) and bpc of each `train.dtype: auto` run trained in bf16 autocast and in "
        "fp32 (same seed, same steps); the committed number and the dtype it was trained in (metrics/RUN.json).",
        "",
        "| run | bf16 loss | fp32 loss | fp32 − bf16 | bf16 bpc | fp32 bpc | committed loss | committed dtype |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in runs:
        b, f = by[name, "bfloat16"]["val"], by[name, "float32"]["val"]
        done = committed.get(name, {})
        cells = [f"{b['loss']:.4f}", f"{f['loss']:.4f}", f"{f['loss'] - b['loss']:+.4f}", f"{b['bpc']:.4f}",
                 f"{f['bpc']:.4f}", f"{done['val/loss']:.4f}" if "val/loss" in done else "",
                 done.get("train/dtype", "")]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    measured = [r for r in results if not r.get("kept")]
    minutes = sum(r["seconds"] for r in measured) / 60
    lines += ["", f"{len(measured)} trainings, {minutes:.1f} minutes of training and scoring in all."]
    return "\n".join(lines) + "\n"


def as_json(results: list[dict], runs: list[str]) -> dict:
    """The numbers behind the table, by run and dtype (what `lm verify` reads)."""
    by = {(r["run"], r["dtype"]): r for r in results}
    return {
        name: {d: {"val/loss": by[name, d]["val"]["loss"], "val/bpc": by[name, d]["val"]["bpc"]} for d in DTYPES}
        for name in runs
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", metavar="RUN", help="runs to train both ways (default: every auto run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads a run (default 0: torch's, as the pipeline)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once (with --threads 1: one per core)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    ap.add_argument("--tokenizers", type=Path, default=Path("tokenizers"), help="built tokenizers (dvc repro)")
    ap.add_argument("--metrics", type=Path, default=Path("metrics"), help="the committed metrics (for the table)")
    ap.add_argument("--out", type=Path, help="also write the table to this .md file and its numbers beside it (.json)")
    ap.add_argument(
        "--merge", action="store_true", help="with --out and RUNs: keep the other runs' rows of the existing FILE.json"
    )
    args = ap.parse_args(argv)
    if args.merge and not (args.out and args.runs):
        ap.error("--merge re-measures the RUNs named and keeps the other rows of --out: name both")

    from lm.config import ParamsError, load_params
    from lm.precision import cpu_native_bf16

    try:
        study = load_params(args.params)
    except ParamsError as e:
        ap.error(str(e))
    runs = args.runs or [n for n, r in study.runs.items() if r.train.dtype == "auto"]
    problems = run_problems(study, runs, args.params, args.tokenizers, "has no dtype")
    native, why = cpu_native_bf16()
    if not native:
        problems.append(f"this CPU has no native bf16 ({why}): training in bf16 here would take ~100x as long")
    if not runs or problems:
        ap.error("; ".join(problems) or f"{args.params} has no run with train.dtype: auto; name RUNs")
    jobs = [
        (n, study.runs[n].model_dump_json(), str(args.tokenizers / study.runs[n].tokenizer), study.runs[n].train.seed,
         d, args.threads)
        for n in runs
        for d in DTYPES
    ]  # fmt: skip
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(train_and_score, *zip(*jobs, strict=True)))
    kept = _kept(args.out, runs) if args.merge and args.out else {}
    results, runs = with_kept(results, runs, kept, list(study.runs))
    committed = {n: json.loads(p.read_text()) for n in runs if (p := args.metrics / f"{n}.json").is_file()}
    text = table(results, runs, committed, args.threads)
    if kept:
        text += (f"\n{', '.join(kept)}: carried over from the previous table (`--merge`); the trainings and "
                 "minutes above count only the runs measured now.\n")  # fmt: skip
    print(text)
    if args.out:
        atomic_write_text(args.out.with_suffix(".md"), text)
        write_json(args.out.with_suffix(".json"), as_json(results, runs))


def with_kept(results: list[dict], runs: list[str], kept: dict[str, dict], order: list[str]):
    """`results` and `runs` with the `kept` rows (as_json's form) added, the runs in `order` (the params')."""
    results = results + [
        {"run": n, "dtype": d, "val": {k: v[d][f"val/{k}"] for k in ("loss", "bpc")}, "kept": True}
        for n, v in kept.items()
        for d in DTYPES
    ]
    return results, [n for n in order if n in set(runs) | set(kept)]


def _kept(out: Path, measured: list[str]) -> dict[str, dict]:
    """The rows of `out`'s JSON twin for the runs not measured now (``--merge``)."""
    path = out.with_suffix(".json")
    return {n: v for n, v in json.loads(path.read_text()).items() if n not in measured} if path.is_file() else {}


if __name__ == "__main__":
    main()
