"""How far a run's number moves with its seed: ``python -m bench.seeds [RUN ...] [--ablation] [--seeds S ...]
[--metric loss|bpc] [--jobs J] [--params FILE] [--tokenizers DIR] [--out FILE] [--plot PNG]``.

The report gives one seed per run, so a difference between two rows means something only against the spread a
single run has across seeds. This trains each named run of the params file again with ``train.seed`` set to each
of ``--seeds`` (the model's initialisation and the batch order; the data split stays the study's, which the
study-level ``seed`` fixes), through the train stage's library call (`lm.train_run.train_run`) and the evaluate stage's
(`lm.evaluate.evaluate_run`, sampling off), each in a temporary folder: the committed outputs are not touched.

Prints, per run, the whole-split val ``--metric`` (loss in nats per token, or bpc, the one that compares runs of
different tokenizers; and test, where the split has one) for every seed, their mean,
sample sd, min and max, and the committed run's own number (metrics/RUN.json); then, for the runs in the order
given, each run's difference from the one before, paired by seed (the same seed draws the same batches): the
mean and sd of the paired differences and how many seeds agree on its sign. ``--ablation`` names the runs of
``report.ablation``. Numbers are deterministic (same seeds, same numbers); the seconds are wall-clock. ``--plot``
draws every seed's number per run, with the mean and the committed run's, as a PNG.

Each job trains with one thread (``--jobs 2`` on 2 cores). Thread count can change the last bits of a CPU
matmul, so a seed equal to the run's own can differ from the committed number in the last decimals; the table
shows both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from lm.atomic import atomic_write_text

DEFAULT_SEEDS = [1337, 1, 2, 3, 4]
"""The runs' own seed (train.seed's default) and four more."""


def train_and_score(
    name: str, run_json: str, tok_dir: str, seed: int, dtype: str | None = None, threads: int = 1
) -> dict:
    """Train `name` (its RunConfig as JSON) with ``train.seed = seed`` (and ``train.dtype = dtype`` if given) in a
    temporary folder and score it on the whole val (and test) split; `threads` torch threads, in this process."""
    from lm.config import EvaluateConfig, RunConfig
    from lm.evaluate import evaluate_run
    from lm.train_run import train_run

    if threads:
        torch.set_num_threads(threads)
    run = RunConfig.model_validate_json(run_json)
    change = {"seed": seed, "device": "cpu"} | ({"dtype": dtype} if dtype else {})
    run = run.model_copy(update={"train": run.train.model_copy(update=change)})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        info = train_run(name, run, Path(tok_dir), w / "model", w / "curve.csv", progress=False)
        weights = json.loads((w / "model" / "config.json").read_text())["sha256"]
        cfg = EvaluateConfig(num_names=0, num_passages=0, quality_prompts=0)
        m = evaluate_run(
            name,
            w / "model",
            Path(tok_dir),
            cfg,
            w / "metrics.json",
            w / "samples.txt",
            w / "inside.safetensors",
            device="cpu",
        )
    return {
        "run": name,
        "seed": seed,
        "val": {k: m[f"val/{k}"] for k in ("loss", "bpc")},
        "test": {k: m[f"test/{k}"] for k in ("loss", "bpc")} if "test/loss" in m else None,
        "dtype": info.get("dtype"),  # counted models have none
        "weights": weights,
        "selected": info.get("selected_step"),
        "steps": info["steps"],
        "seconds": time.perf_counter() - t0,
    }


def run_problems(study, runs: list[str], params: Path, tokenizers: Path, counted: str) -> list[str]:
    """Why the named runs cannot be trained again here: not a run of the params, a tokenizer not built, or a
    counted model (`counted` says what it lacks)."""
    known = [n for n in runs if n in study.runs]
    problems = [f"{n!r} is not a run of {params}" for n in runs if n not in study.runs]
    for n in known:
        tok = study.runs[n].tokenizer
        if not (tokenizers / tok / "stats.json").is_file():
            problems.append(f"{n}: {tokenizers / tok} is not built: `dvc repro tokenize@{tok}`")
    return problems + [f"{n}: a counted model {counted}" for n in known if study.runs[n].model.fitting != "gradient"]


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def _spread(by: dict, names: list[str], seeds: list[int], committed: dict[str, dict], key: str) -> list[str]:
    """Markdown rows of `key` ("val/loss", "test/bpc", ...) per run: every seed, mean, sd, min, max, committed."""
    split, metric = key.split("/")
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | min | max | committed |"]
    lines.append("|---|" + "---:|" * (len(seeds) + 5))
    for name in names:
        vals = [by[name, s][split][metric] for s in seeds]
        done = committed.get(name, {}).get(key)
        cells = [f"{v:.4f}" for v in vals]
        cells += [f"{statistics.fmean(vals):.4f}", f"{_sd(vals):.4f}", f"{min(vals):.4f}", f"{max(vals):.4f}"]
        cells.append(f"{done:.4f}" if done is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def table(
    results: list[dict], runs: list[str], seeds: list[int], committed: dict[str, dict], metric: str = "loss"
) -> str:
    """The markdown: per-run spread of `metric`, then the paired differences of consecutive runs."""
    by = {(r["run"], r["seed"]): r for r in results}
    unit = "nats/token" if metric == "loss" else "bits/character"
    lines = [
        f"### bench.seeds: {dt.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, torch {torch.__version__}, "
        "one thread a run",
        "",
        f"Whole-split val {metric} ({unit}) by `train.seed` (init and batch order; the split is the study's), "
        f"{len(seeds)} seeds.",
        "",
        *_spread(by, runs, seeds, committed, f"val/{metric}"),
    ]
    if tested := [n for n in runs if by[n, seeds[0]]["test"] is not None]:
        lines += [
            "",
            f"Test {metric}, where the split has one:",
            "",
            *_spread(by, tested, seeds, committed, f"test/{metric}"),
        ]
    if len(runs) > 1:
        lines += [
            "",
            f"Each run against the one before it, paired by seed (val {metric}; negative: the later run is better):",
            "",
            "| run | against | committed Δ | paired Δ mean | paired Δ sd | seeds with Δ < 0 |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for before, after in zip(runs, runs[1:], strict=False):
            diffs = [by[after, s]["val"][metric] - by[before, s]["val"][metric] for s in seeds]
            a, b = committed.get(after, {}).get(f"val/{metric}"), committed.get(before, {}).get(f"val/{metric}")
            once = f"{a - b:+.4f}" if a is not None and b is not None else ""
            better = sum(d < 0 for d in diffs)
            lines.append(
                f"| {after} | {before} | {once} | {statistics.fmean(diffs):+.4f} | {_sd(diffs):.4f} "
                f"| {better} of {len(diffs)} |"
            )
    seconds = sum(r["seconds"] for r in results)
    lines += ["", f"{len(results)} trainings, {seconds / 60:.1f} CPU-thread minutes in all."]
    return "\n".join(lines) + "\n"


def plot(
    results: list[dict], runs: list[str], seeds: list[int], committed: dict[str, dict], metric: str, out: Path
) -> None:
    """One row per run (in the given order, top down): a dot per seed, a bar at their mean, a cross at the
    committed run's number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lm.report.figures import save_figure

    by = {(r["run"], r["seed"]): r["val"][metric] for r in results}
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(runs) + 1.2))
    for y, name in enumerate(runs):
        vals = [by[name, s] for s in seeds]
        ax.scatter(vals, [y] * len(vals), s=22, color="tab:blue", alpha=0.7, label="a seed" if y == 0 else None)
        ax.plot([statistics.fmean(vals)] * 2, [y - 0.3, y + 0.3], color="black", lw=1.5,
                label="mean" if y == 0 else None)  # fmt: skip
        if (done := committed.get(name, {}).get(f"val/{metric}")) is not None:
            ax.scatter([done], [y], marker="x", s=50, color="tab:red", label="committed" if y == 0 else None)
    ax.set_yticks(range(len(runs)), runs)
    ax.invert_yaxis()  # the first run on top, as in the tables
    ax.set_xlabel(f"val {metric} ({'nats/token' if metric == 'loss' else 'bits/character'}), whole split")
    ax.set_title(f"{len(seeds)} seeds a run (train.seed: init and batch order)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", metavar="RUN", help="runs of the params file, in the order to compare them")
    ap.add_argument("--ablation", action="store_true", help="the runs of report.ablation (after any RUN given)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=DEFAULT_SEEDS, help="train.seed values (default: %(default)s)"
    )
    ap.add_argument("--metric", choices=["loss", "bpc"], default="loss", help="val loss (nats/token) or bpc")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at once, one process and thread each")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    ap.add_argument("--tokenizers", type=Path, default=Path("tokenizers"), help="built tokenizers (dvc repro)")
    ap.add_argument("--metrics", type=Path, default=Path("metrics"), help="the committed metrics (for the table)")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--plot", type=Path, help="also draw every seed's number per run to this PNG")
    args = ap.parse_args(argv)

    from lm.config import ParamsError, load_params

    try:
        study = load_params(args.params)
    except ParamsError as e:
        ap.error(str(e))
    runs = list(dict.fromkeys(args.runs + (study.report.ablation if args.ablation else [])))
    if not runs:
        ap.error("name at least one RUN, or --ablation")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {args.seeds}")
    problems = run_problems(study, runs, args.params, args.tokenizers, "has no seed to vary")
    if problems:
        ap.error("; ".join(problems))
    jobs = [
        (n, study.runs[n].model_dump_json(), str(args.tokenizers / study.runs[n].tokenizer), s)
        for n in runs
        for s in args.seeds
    ]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(train_and_score, *zip(*jobs, strict=True)))
    committed = {}
    for n in runs:
        path = args.metrics / f"{n}.json"
        if path.is_file():
            committed[n] = json.loads(path.read_text())
    text = table(results, runs, args.seeds, committed, args.metric)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    if args.plot:
        plot(results, runs, args.seeds, committed, args.metric, args.plot)


if __name__ == "__main__":
    main()
