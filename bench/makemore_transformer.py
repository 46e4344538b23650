"""The reference for the transformer anchor: makemore.py's default run, written plainly, on its own split.

``python -m bench.makemore_transformer [--seeds S ...] [--steps N] [--split makemore|study] [--select test|val]
[--jobs J] [--names FILE] [--out FILE]``

makemore's README gives the test loss its default settings reach on names.txt (lm/references.py,
makemore-transformer-test); makemore.py trains without a step limit and keeps the model whose test loss is
lowest. This script is that run written plainly (no study code), so the anchor can be checked against the source's
own recipe rather than the study's:

- split as makemore.py: ``torch.manual_seed(seed)``, then ``torch.randperm`` over the 32,033 names, the last 1,000
  are the test set, the other 31,033 train (seed 3407 is makemore.py's default, so its own test names);
- each name a row ``<START> name`` → ``name <STOP>`` (id 0 for both) padded to 16 positions, padding ignored;
- the transformer of makemore.py: 4 layers, 4 heads, n_embd 64, learned positions, pre-LayerNorm blocks, tanh-GELU
  MLP of 4 × 64, biases everywhere but the head, PyTorch's default initialisation (204,544 parameters);
- AdamW on every parameter (lr 5e-4, betas 0.9/0.99, eps 1e-8, weight decay 0.01), constant lr, 32 names a step
  drawn with replacement;
- ``--split study`` trains and tests on the study's ``names-makemore`` split instead (presets/sources.yaml: names
  shuffled with ``random.Random(42)``, 30,034 train / 999 val / 1,000 test), so the recipe's test loss
  is on the same names as the study's names-gpt run's;
- every 500 steps makemore's test estimate: the mean of the per-batch mean losses over the 1,000 test names in
  shuffled batches of 100; the lowest one is kept (makemore selects on its test set);
- ``--select val`` (with ``--split study``) keeps the model whose estimate on the 999 *val* names is lowest, as the
  study's names-gpt run does, so the kept model's test loss is not chosen on the test names it is reported on.

Prints, per seed, the estimates every ``--every`` steps, the kept step and its estimate, and the kept model's
loss over the whole test split (and val split, with ``--select val``; token-weighted, the study's metric), then
writes the table to ``--out``.
``--jobs`` trains seeds in parallel processes, one thread each.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import add_names_argument, names_text
from lm.atomic import atomic_write_text
from lm.references import value

SPLITS = {
    "makemore": "its own split (31,033 / 1,000 names, randperm after the seed)",
    "study": "the study's names-makemore split (30,034 / 1,000 test names, as the names-gpt run)",
}
SOURCES_PRESET = Path(__file__).resolve().parents[1] / "presets" / "sources.yaml"
"""Where the study's names-makemore split is defined (``--split study``)."""
MAKEMORE_SEED = 3407
"""makemore.py's default ``--seed``: its split and its run."""
PUBLISHED_TEST = value("makemore-transformer-test")
"""makemore README: the test loss of the default settings."""
N_LAYER, N_HEAD, N_EMBD, BATCH, LR, WEIGHT_DECAY, TEST_NAMES = 4, 4, 64, 32, 5e-4, 0.01, 1000


class Attention(nn.Module):
    """Causal multi-head self-attention, query/key/value from one Linear (Vaswani et al. 2017)."""

    def __init__(self, block_size: int):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // N_HEAD)  # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, block_size: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(N_EMBD), nn.LayerNorm(N_EMBD)
        self.attn = Attention(block_size)
        self.c_fc, self.c_proj = nn.Linear(N_EMBD, 4 * N_EMBD), nn.Linear(4 * N_EMBD, N_EMBD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Transformer(nn.Module):
    """makemore.py's Transformer: PyTorch's default init everywhere (it defines no init of its own)."""

    def __init__(self, vocab_size: int, block_size: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, N_EMBD), nn.Embedding(block_size, N_EMBD)
        self.h = nn.ModuleList(Block(block_size) for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)


def encode(words: list[str], stoi: dict[str, int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``0 name`` → ``name 0``, padded to `width` (inputs 0, targets -1: ignored)."""
    X = torch.zeros(len(words), width, dtype=torch.long)
    Y = torch.full((len(words), width), -1, dtype=torch.long)
    for i, w in enumerate(words):
        ix = torch.tensor([stoi[c] for c in w], dtype=torch.long)
        X[i, 1 : 1 + len(ix)] = ix
        Y[i, : len(ix)] = ix
        Y[i, len(ix)] = 0
    return X, Y


def split(words: list[str]) -> tuple[list[str], list[str]]:
    """makemore.py's split, drawn from torch's global RNG right after ``torch.manual_seed``: a randperm, whose last
    1,000 names are the test set."""
    rp = torch.randperm(len(words)).tolist()
    return [words[i] for i in rp[:-TEST_NAMES]], [words[i] for i in rp[-TEST_NAMES:]]


@torch.no_grad()
def batch_mean_estimate(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, g: torch.Generator) -> float:
    """makemore's estimate: the mean of per-batch mean losses, shuffled batches of 100, at most 11 batches."""
    model.eval()
    order = torch.randperm(len(X), generator=g)[: 11 * 100]
    losses = [model(X[order[i : i + 100]], Y[order[i : i + 100]]).item() for i in range(0, len(order), 100)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def whole_split_loss(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> float:
    """Token-weighted mean loss over every name (the study's metric)."""
    model.eval()
    total = sum(
        model(X[i : i + 500], Y[i : i + 500]).item() * (Y[i : i + 500] >= 0).sum().item() for i in range(0, len(X), 500)
    )
    return total / (Y >= 0).sum().item()


def study_split(words: list[str], preset: Path = SOURCES_PRESET) -> tuple[list[str], list[str], list[str]]:
    """The study's names-makemore split, as `preset` defines it (its seed and fractions): train, val and test
    names."""
    from lm.config import load_params
    from lm.data import split_corpus

    params = load_params(preset)
    parts = split_corpus("\n".join(words), "lines", params.corpora["names-makemore"].split, params.seed)
    return parts["train"], parts["val"], parts["test"]


def train_one(
    seed: int, words: list[str], steps: int, every: int, which: str = "makemore", select: str = "test"
) -> dict:
    """One run of makemore's loop on `which` split: the trace (every `every` steps: train, `select` and, when that
    is val, test estimates), the step whose `select` estimate was lowest, that estimate, and the kept model's
    whole-split losses (``best_test``; ``best_val`` when selecting on val)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    chars = sorted(set("".join(words)))
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    width = max(len(w) for w in words) + 1  # <START> + the longest name: makemore's block_size, 16
    torch.manual_seed(seed)  # as makemore.py: the split's randperm, the init and the batches all draw from it
    if which == "makemore":
        train_words, test_words = split(words)
        val_words = []
    else:
        train_words, val_words, test_words = study_split(words)
    if select == "val" and not val_words:
        raise ValueError("selecting on val needs a split with val names: --split study")
    Xtr, Ytr = encode(train_words, stoi, width)
    Xte, Yte = encode(test_words, stoi, width)
    Xse, Yse = encode(val_words, stoi, width) if select == "val" else (Xte, Yte)
    model = Transformer(len(chars) + 1, width)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.99), eps=1e-8)
    eval_g = torch.Generator().manual_seed(seed)
    best = (math.inf, 0, None)
    trace = []
    for step in range(1, steps + 1):
        ix = torch.randint(0, len(Xtr), (BATCH,))
        loss = model(Xtr[ix], Ytr[ix])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            est = batch_mean_estimate(model, Xse, Yse, eval_g)
            if est < best[0]:
                best = (est, step, copy.deepcopy(model.state_dict()))
            if step % every == 0:
                row = (step, batch_mean_estimate(model, Xtr, Ytr, eval_g), est)
                trace.append(row + ((batch_mean_estimate(model, Xte, Yte, eval_g),) if select == "val" else ()))
    model.load_state_dict(best[2])
    return {
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "trace": trace,
        "best_step": best[1],
        "best_estimate": best[0],
        "best_test": whole_split_loss(model, Xte, Yte),
        "best_val": whole_split_loss(model, Xse, Yse) if select == "val" else None,
        "select_names": len(Xse),
        "seconds": time.perf_counter() - t0,
    }


def table(results: list[dict], steps: int, which: str = "makemore", select: str = "test") -> str:
    lines = [
        f"### bench.makemore_transformer: {dt.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, "
        f"torch {torch.__version__}",
        "",
        f"makemore.py's default transformer ({results[0]['params']:,} params) on {SPLITS[which]}, {steps:,} steps. "
        f"Estimates are makemore's (train: 11 random batches of 100 names; {select}: the "
        f"{results[0]['select_names']:,} {select} names). "
        f"The kept model is the one with the lowest {select} estimate.",
        "",
        "| seed | step | train estimate | "
        + ("val estimate | test estimate |" if select == "val" else "test estimate |"),
        "|---|---:|---:|---:|" + ("---:|" if select == "val" else ""),
    ]
    for r in results:
        lines += [f"| {r['seed']} | {t[0]:,} | " + " | ".join(f"{x:.4f}" for x in t[1:]) + " |" for t in r["trace"]]
    whole = "whole val split | whole test split" if select == "val" else "whole test split"
    lines += ["", f"| seed | kept step (lowest {select} estimate) | its {select} estimate | {whole} | s |"]
    lines += ["|---|---:|---:|---:|---:|" + ("---:|" if select == "val" else "")]
    for r in results:
        kept = f"{r['best_step']:,} | {r['best_estimate']:.4f} | "
        kept += (f"{r['best_val']:.4f} | " if select == "val" else "") + f"{r['best_test']:.4f}"
        lines.append(f"| {r['seed']} | {kept} | {r['seconds']:.0f} |")
    lines += ["", f"Published (makemore README, default settings, no step count given): test ~{PUBLISHED_TEST}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[MAKEMORE_SEED], help="seeds (3407: makemore's default)")
    ap.add_argument("--steps", type=int, default=60_000, help="optimizer steps")
    ap.add_argument("--split", choices=sorted(SPLITS), default="makemore", help="whose train/test names")
    ap.add_argument("--select", choices=["test", "val"], default="test", help="which names choose the kept model")
    ap.add_argument("--every", type=int, default=5_000, help="steps between rows of the printed trace")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process and thread each")
    add_names_argument(ap)
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.steps < 500 or args.every % 500:
        ap.error("--steps must be at least 500 and --every a multiple of 500 (makemore evaluates every 500 steps)")
    if args.select == "val" and args.split != "study":
        ap.error("--select val needs --split study (makemore's own split has no val names)")
    words = [w.strip() for w in names_text(ap, args.names).splitlines() if w.strip()]
    n = len(args.seeds)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(
            pool.map(
                train_one,
                args.seeds,
                [words] * n,
                [args.steps] * n,
                [args.every] * n,
                [args.split] * n,
                [args.select] * n,
            )
        )
    text = table(results, args.steps, args.split, args.select)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
