"""The report's figures of the whole study: loss curves, bits per character against size, where the parameters are,
the names bigram tables and the character embeddings' similarity. PNGs with reproducible bytes, drawn at the size
they are read at: no axes holds more lines than its colour cycle has colours, and labels do not overlap."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from adjustText import adjust_text  # noqa: E402

from lm.config import StudyConfig  # noqa: E402
from lm.models.base import COMPONENTS  # noqa: E402

COLORS = plt.get_cmap("tab10").colors
"""One colour per line of an axes; a panel with more series than this is split, never recoloured."""
ADJUST_ITERATIONS = 500
"""adjustText's iterations when placing labels (a count, not its default 1-second budget: reproducible PNGs)."""
NGRAM = "ngram"
"""The counted n-gram family: a panel draws its best order as one level, not a line per order."""


def save_figure(fig, path: Path) -> None:
    """Write `fig` to `path` as a PNG with reproducible bytes (no timestamp), through a temp file, and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})  # no timestamps: reproducible bytes
    plt.close(fig)
    tmp.replace(path)


def curve_panels(study: StudyConfig) -> list[tuple[str, list[str]]]:
    """The loss-curve panels: per corpus its ladder, and the ablation (``report.ablation``) on a panel of its own."""
    ablation = set(study.report.ablation)
    panels: dict[str, list[str]] = {}
    for name, run in study.runs.items():
        corpus = study.tokenizers[run.tokenizer].corpus
        key = f"{corpus}: the ablation" if name in ablation else corpus
        panels.setdefault(key, []).append(name)
    return list(panels.items())


def _draw_best_ngram(ax, levels: dict[str, float]) -> None:
    """The n-gram orders of a panel as one level: the best order's (the others are the report's n-gram table)."""
    best = min(levels, key=levels.get)
    label = f"{best}, the best of {len(levels)} Kneser–Ney orders (counted)" if len(levels) > 1 else f"{best} (counted)"
    ax.axhline(levels[best], color="0.2", ls=":", lw=1.5, label=label)


def _draw_panel(ax, title: str, runs: list[str], curves: dict[str, pd.DataFrame], table: pd.DataFrame) -> None:
    rows = table.set_index("run")
    per_char = {r: rows.loc[r, "val tokens per character"] / math.log(2) for r in runs}  # nats/token -> bits/char
    counted = {r: curves[r]["val_loss"].iloc[0] * per_char[r] for r in runs if len(curves[r]) == 1}
    ngrams = {r: v for r, v in counted.items() if rows.loc[r, "family"] == NGRAM}
    lines = [r for r in runs if r not in ngrams]
    if len(lines) > len(COLORS):
        raise ValueError(f"loss-curve panel {title!r} has {len(lines)} lines, more than {len(COLORS)} colours")
    if ngrams:
        _draw_best_ngram(ax, ngrams)
    shown = [min(ngrams.values())] if ngrams else []
    for color, name in zip(COLORS, lines):
        c, k = curves[name], per_char[name]
        if name in counted:  # fitted by counting: one point, drawn as a level
            ax.axhline(counted[name], color=color, ls=":", lw=1.5, label=f"{name} (counted)")
            continue
        ax.plot(c["step"], c["val_loss"] * k, color=color, label=name)
        ax.plot(c["step"], c["train_loss"] * k, color=color, ls="--", alpha=0.45)
        picked = c[c["step"] == rows.loc[name, "selected step"]]  # the step whose weights the checkpoint holds
        ax.plot(picked["step"], picked["val_loss"] * k, "o", color=color, ms=7, mfc="none", mew=1.6)
        shown += list(c["val_loss"].iloc[1:] * k)  # step 0 (ln V) would flatten everything else
    if shown:
        lo, hi = min(shown), max(shown)
        ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.08 * (hi - lo + 0.1))
    ax.set(title=title, xlabel="step", ylabel="bits per character")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)


def plot_loss_curves(study: StudyConfig, curves_dir: Path, table: pd.DataFrame, out: Path) -> None:
    """Val (solid) and train (dashed) loss in bits per character per step, a panel per corpus and one for the
    ablation, with a ring on the step each checkpoint holds; the counted n-grams of a panel as their best order."""
    panels = curve_panels(study)
    curves = {name: pd.read_csv(curves_dir / f"{name}.csv") for _, runs in panels for name in runs}
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.8 * rows), squeeze=False)
    for ax, (title, runs) in zip(axes.flat, panels):
        _draw_panel(ax, title, runs, curves, table)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Loss curves: val (solid, the fixed val subset), train (dashed), ○ the checkpoint kept; "
        "bits per character = nats per token × tokens per character / ln 2",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, out)


def plot_bpc_vs_params(study: StudyConfig, table: pd.DataFrame, out: Path) -> None:
    """Val bits per character against size, a panel per corpus; the ablation's runs as one group of points (their
    own table and figure tell them apart); labels placed without overlap (adjustText)."""
    ablation = set(study.report.ablation)
    corpora = list(dict.fromkeys(table["corpus"]))
    fig, axes = plt.subplots(1, len(corpora), figsize=(6.2 * len(corpora), 5.4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        g = table[table["corpus"] == corpus]
        abl = g[g["run"].isin(ablation)]
        g = g[~g["run"].isin(ablation)]
        counted = g["family"] == NGRAM
        ax.scatter(g.loc[counted, "params"], g.loc[counted, "val bpc"], color="0.5", marker="s", s=30, label="n-gram")
        ax.scatter(g.loc[~counted, "params"], g.loc[~counted, "val bpc"], color=COLORS[0], s=40, label="trained")
        if len(abl):
            ax.scatter(abl["params"], abl["val bpc"], facecolor="none", edgecolor=COLORS[3], s=40,
                       label=f"the ablation ({len(abl)} runs)")  # fmt: skip
        texts = [
            ax.text(p, b, r.removeprefix(f"{corpus}-"), fontsize=8)
            for r, p, b in zip(g["run"], g["params"], g["val bpc"])
        ]
        ax.set(xscale="log", xlabel="parameters (n-gram: stored entries)", ylabel="val bits per character")
        ax.set_title(corpus)
        ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        points = pd.concat([g, abl])
        # A fixed number of iterations: adjustText's default stops after 1 s, so the PNG would depend on the clock.
        adjust_text(texts, x=list(points["params"]), y=list(points["val bpc"]), ax=ax, iter_lim=ADJUST_ITERATIONS,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6})  # fmt: skip
    fig.suptitle("The ladder: val bits per character against size", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out)


def plot_param_shares(shares: dict[str, dict[str, int]], out: Path) -> None:
    """Stacked bars: the share of each component in every model's parameters. The counted n-grams, all n-gram
    entries and no weights, are left out (one bar of a single colour each would say nothing)."""
    names = [n for n, c in shares.items() if set(c) - {NGRAM}]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(names) + 1.2))
    left = np.zeros(len(names))
    for j, comp in enumerate(COMPONENTS):
        frac = np.array([shares[n].get(comp, 0) / max(1, sum(shares[n].values())) for n in names])
        if frac.any():
            ax.barh(names, frac, left=left, color=f"C{j}", label=comp.replace("_", " "))
            left += frac
    ax.invert_yaxis()
    ax.set(xlabel="share of parameters", xlim=(0, 1))
    ax.legend(ncol=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    save_figure(fig, out)


def reference_shares() -> dict[str, dict[str, int]]:
    """GPT-2 small as the Raschka learning journey counts it (lm.model_size, on the meta device): untied as
    configured and with the head tied to the token embedding (the model whose shares it quotes)."""
    from lm.model_size import report_for

    r = report_for("gpt2-small")
    return {"gpt2-small (reference, untied)": r.untied.components, "gpt2-small (reference, tied)": r.tied.components}


def _label_axes(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)


def plot_bigram_heatmaps(counted: np.ndarray, learned: np.ndarray, labels: list[str], out: Path) -> None:
    """The Language modeling journey's figs. 1-2: P(next | current) from counts and from gradient descent, side by
    side on one colour scale."""
    fig, axes = plt.subplots(1, 2, figsize=(16, 7.6))
    vmax = float(max(counted.max(), learned.max()))  # one colour scale, so the two tables compare
    for ax, probs, title in [
        (axes[0], counted, "counted (+k smoothing)"),
        (axes[1], learned, "learned by gradient descent"),
    ]:
        im = ax.imshow(probs, cmap="Blues", vmin=0, vmax=vmax)
        _label_axes(ax, labels)
        ax.set(title=f"P(next | current): {title}", xlabel="next", ylabel="current")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, out)


def plot_embedding_similarity(embeddings: dict[str, np.ndarray], labels: list[str], out: Path) -> None:
    """The Language modeling journey's figs. 3 and 5: cosine similarity between learned character embeddings."""
    fig, axes = plt.subplots(1, len(embeddings), figsize=(7.5 * len(embeddings), 6.6), squeeze=False)
    for ax, (name, emb) in zip(axes[0], embeddings.items()):
        e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        im = ax.imshow(e @ e.T, cmap="RdBu_r", vmin=-1, vmax=1)
        _label_axes(ax, labels)
        ax.set_title(f"{name}: cosine similarity of embeddings")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, out)
