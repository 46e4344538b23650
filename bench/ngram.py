"""Kneser–Ney n-gram speed: ``python -m bench.ngram [--tokens N] [--write]``.

For every ngram run of params.yaml: the seconds to fit it (one counting pass over its training split, through
the study's own `lm.trainer.fit`) and to score ``--tokens`` tokens (default 100,000) of its validation split
with the evaluate stage's one scoring path (`lm.metrics.score`), both best of ``--repeats``. Needs the
tokenized corpora (``dvc repro tokenize@...``). Prints a markdown table; ``--write`` appends it to
reports/bench.md. Figures, not tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch

from lm.batches import for_model
from lm.config import load_params
from lm.metrics import score
from lm.models import build_model
from lm.tokenizer import load_ids, load_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ngram", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--tokens", type=int, default=100_000, help="validation tokens scored (default: 100,000)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per run; the fastest counts (default: 3)")
    p.add_argument("--write", action="store_true", help="append the table to reports/bench.md")
    args = p.parse_args(argv)
    study = load_params(args.params)
    rows = ["| run | order | V | n-gram entries | fit s (train tokens) | score s (val tokens) | val tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, run in study.runs.items():
        if run.model.family != "ngram":
            continue
        tok = Path("tokenizers") / run.tokenizer
        stats = load_stats(tok)
        fmt, boundary = study.corpus_of(name).format, stats.get("boundary_id")
        V = int(stats["vocab_size"])
        train = for_model(run.model, load_ids(tok, "train"), fmt, boundary)
        val_ids = np.asarray(load_ids(tok, "val"))[: args.tokens + 1]
        val = for_model(run.model, val_ids, fmt, boundary)
        fit_s, score_s = [], []
        for _ in range(args.repeats):
            model = build_model(run.model, V)
            t0 = time.perf_counter()
            n_train = 0
            for x, y in train.iterate(4096):  # as lm.trainer's counting pass
                model.accumulate(x, y)
                n_train += int((y != -1).sum())
            model.eval()
            with torch.no_grad():
                model(torch.zeros(1, 1, dtype=torch.long))  # the tables are built on first use
            fit_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, n_val = score(model, val.iterate(study.evaluate.batch_size))
            score_s.append(time.perf_counter() - t0)
        entries = sum(q.numel() for q in model.parameters())
        rows.append(
            f"| {name} | {run.model.order} | {V} | {entries:,} | {min(fit_s):.2f} ({n_train:,}) "
            f"| {min(score_s):.2f} ({n_val:,}) | {n_val / min(score_s):,.0f} |"
        )
        print(rows[-1], flush=True)
    head = [f"### bench.ngram, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} UTC", "",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}", ""]  # fmt: skip
    text = "\n".join(head + rows) + "\n"
    print("\n" + text)
    if args.write:
        with open("reports/bench.md", "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
