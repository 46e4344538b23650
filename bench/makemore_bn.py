"""The reference for the BatchNorm MLP anchor: makemore part 3's loop as the lecture writes it, over several seeds.

``python -m bench.makemore_bn [--seeds S ...] [--steps N] [--jobs J] [--names FILE] [--out FILE]``

Zero to Hero lecture 3 (makemore part 3, which the Language modeling journey follows) trains the BatchNorm MLP
(context 3, embedding 10, hidden 200) for 200,000 SGD steps of 32 examples and prints its train and val loss
(lm/references.py: makemore-bn-notebook-train, -val): one run, from the one ``torch.Generator`` seeded 2147483647
that draws its weights and its batches. The study's anchor table reads makemore-bn-val, the lecture's rounding.
This script is that loop written plainly (no study code), so the published number can be read against the
distribution it is one draw of:

- names.txt shuffled by ``random.seed(42)``, cut 80/10/10 (25,626 / 3,203 / 3,204 names), every position of a name
  one (3-character context, next character) example, '.' (id 0) padding before the start and ending each name;
- C ~ N(0, 1), W1 ~ N(0, 1) * (5/3) / sqrt(30), W2 ~ N(0, 1) * 0.01, b2 = 0, drawn in that order from the generator
  (b1 is drawn and unused, as in the lecture), BatchNorm gain 1 / bias 0;
- BatchNorm by the batch's mean and unbiased std (no epsilon), running mean and std at momentum 0.001, which
  evaluation uses;
- batches of 32 examples drawn uniformly with replacement (``torch.randint``) from the same generator,
  SGD lr 0.1, 0.01 from step 100,000;
- train, val and test loss of the last model over each whole split.

Prints a markdown table (one row per seed, then mean, standard deviation and range) and writes it to ``--out``.
Each seed takes about 110 s on one CPU core; ``--jobs`` runs seeds in parallel processes, one thread each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import add_names_argument, names_text
from lm.atomic import atomic_write_text
from lm.references import value

LECTURE_SEED = 2147483647
"""The lecture's ``torch.Generator().manual_seed(2147483647)``: its published run."""
PUBLISHED = {"train": value("makemore-bn-notebook-train"), "val": value("makemore-bn-notebook-val")}
"""The lecture's "add batch norm layer" losses (its loss log, rounded to 4 places)."""
BLOCK_SIZE, N_EMBD, N_HIDDEN, BATCH, SPLIT_SEED = 3, 10, 200, 32, 42


def split_words(words: list[str]) -> dict[str, list[str]]:
    """The lecture's split: ``random.seed(42); random.shuffle(words)``, cut at int(0.8 n) and int(0.9 n)."""
    words = list(words)
    random.Random(SPLIT_SEED).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


def vocab(words: list[str]) -> dict[str, int]:
    """'.' is 0, the letters follow in sorted order (the lecture's stoi)."""
    stoi = {ch: i + 1 for i, ch in enumerate(sorted(set("".join(words))))}
    stoi["."] = 0
    return stoi


def build_dataset(words: list[str], stoi: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context of BLOCK_SIZE ids, next id) pair of every name, '.'-padded at the start, '.' at the end."""
    xs, ys = [], []
    for w in words:
        context = [0] * BLOCK_SIZE
        for ch in w + ".":
            ix = stoi[ch]
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(xs), torch.tensor(ys)  # (N, BLOCK_SIZE), (N,)


def train_one(seed: int, data: dict[str, tuple[torch.Tensor, torch.Tensor]], vocab_size: int, steps: int) -> dict:
    """One run of the lecture's loop; returns the last model's loss on each whole split and the seconds taken."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    fan_in = N_EMBD * BLOCK_SIZE
    C = torch.randn((vocab_size, N_EMBD), generator=g)
    W1 = torch.randn((fan_in, N_HIDDEN), generator=g) * (5 / 3) / fan_in**0.5
    torch.randn(N_HIDDEN, generator=g)  # the lecture's b1: drawn, then unused (BatchNorm's bias replaces it)
    W2 = torch.randn((N_HIDDEN, vocab_size), generator=g) * 0.01
    b2 = torch.randn(vocab_size, generator=g) * 0
    bngain, bnbias = torch.ones((1, N_HIDDEN)), torch.zeros((1, N_HIDDEN))
    bnmean_running, bnstd_running = torch.zeros((1, N_HIDDEN)), torch.ones((1, N_HIDDEN))
    parameters = [C, W1, W2, b2, bngain, bnbias]
    for p in parameters:
        p.requires_grad_(True)
    Xtr, Ytr = data["train"]
    for i in range(steps):
        ix = torch.randint(0, Xtr.shape[0], (BATCH,), generator=g)
        hpreact = C[Xtr[ix]].view(BATCH, fan_in) @ W1  # (B, 3, 10) -> (B, 30): the three embeddings side by side
        bnmeani = hpreact.mean(0, keepdim=True)
        bnstdi = hpreact.std(0, keepdim=True)  # unbiased, as the lecture's torch.std
        hpreact = bngain * (hpreact - bnmeani) / bnstdi + bnbias
        with torch.no_grad():
            bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
            bnstd_running = 0.999 * bnstd_running + 0.001 * bnstdi
        loss = F.cross_entropy(torch.tanh(hpreact) @ W2 + b2, Ytr[ix])
        for p in parameters:
            p.grad = None
        loss.backward()
        lr = 0.1 if i < 100_000 else 0.01
        with torch.no_grad():
            for p in parameters:
                p -= lr * p.grad

    @torch.no_grad()
    def split_loss(X: torch.Tensor, Y: torch.Tensor) -> float:
        hpreact = C[X].view(X.shape[0], fan_in) @ W1
        hpreact = bngain * (hpreact - bnmean_running) / bnstd_running + bnbias
        return F.cross_entropy(torch.tanh(hpreact) @ W2 + b2, Y).item()

    out = {name: split_loss(*xy) for name, xy in data.items()}
    return {"seed": seed, **out, "seconds": time.perf_counter() - t0}


def run(text: str, seeds: list[int], steps: int, jobs: int = 1) -> list[dict]:
    """Train every seed (``jobs`` at once) on names.txt's `text`; one result dict per seed, in order."""
    words = text.splitlines()
    stoi = vocab(words)
    data = {name: build_dataset(ws, stoi) for name, ws in split_words(words).items()}
    if jobs <= 1:
        return [train_one(s, data, len(stoi), steps) for s in seeds]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(train_one, seeds, [data] * len(seeds), [len(stoi)] * len(seeds), [steps] * len(seeds)))


def table(results: list[dict], steps: int) -> str:
    lines = [
        f"### bench.makemore_bn: {dt.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, torch {torch.__version__}",
        "",
        f"makemore part 3's BatchNorm MLP as the lecture writes it, {steps:,} steps; last model, whole splits.",
        "",
        "| seed | train | val | test | s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        mark = " (the lecture's)" if r["seed"] == LECTURE_SEED else ""
        lines.append(
            f"| {r['seed']}{mark} | {r['train']:.4f} | {r['val']:.4f} | {r['test']:.4f} | {r['seconds']:.0f} |"
        )
    if len(results) > 1:
        for name, f in (("mean", statistics.mean), ("sd", statistics.stdev)):
            cells = " | ".join(f"{f([r[k] for r in results]):.4f}" for k in ("train", "val", "test"))
            lines.append(f"| {name} | {cells} | |")
        cells = " | ".join(
            f"{min(r[k] for r in results):.4f}–{max(r[k] for r in results):.4f}" for k in ("train", "val", "test")
        )
        lines.append(f"| range | {cells} | |")
    lines += ["", f"Published (the lecture's seed {LECTURE_SEED}): train {PUBLISHED['train']}, val {PUBLISHED['val']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[LECTURE_SEED, *range(1, 9)], help="generator seeds")
    ap.add_argument("--steps", type=int, default=200_000, help="SGD steps (the lecture: 200,000)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process and thread each")
    add_names_argument(ap)
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    text = table(run(names_text(ap, args.names), args.seeds, args.steps, args.jobs), args.steps)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
