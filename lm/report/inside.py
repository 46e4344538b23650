"""The inside-the-model figures, drawn from files the earlier stages wrote: attention grids, the names bigram tables
and embeddings (inside/<run>.safetensors, written by evaluate: lm.inspection.figure_arrays) and training health
(models/<run>/health.json, written by train: lm.health). Nothing here loads or runs a model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter
from safetensors import safe_open

from lm.config import StudyConfig
from lm.report.figures import (
    COLORS,
    plot_bigram_heatmaps,
    plot_embedding_similarity,
    plt,
    save_figure,
)

TOKEN_INCHES = 0.15
"""An attention map's cell: 16 pixels at the report's 110 dpi, room for a 9-point token label."""
LABEL_POINTS = 9
BIGRAM_PAIR = ("bigram_counts", "bigram_nn")
"""The counted and the learned table of the Language modeling journey's figs. 1-2: two runs of these families on
one char tokenizer."""


@dataclass
class Arrays:
    """One run's inside/<run>.safetensors: its tensors as numpy arrays and its labels."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    passage_labels: list[str] = field(default_factory=list)
    vocab_labels: list[str] = field(default_factory=list)


def read_arrays(path: Path) -> Arrays:
    """The arrays the evaluate stage wrote for one run (empty when the file has none)."""
    with safe_open(path, framework="np") as f:
        labels = json.loads((f.metadata() or {}).get("lm.labels", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return Arrays(tensors, labels.get("passage_labels", []), labels.get("vocab_labels", []))


# ----------------------------------------------------------------------------------------------
# attention grids


def plot_attention_grid(
    name: str, maps: np.ndarray, labels: list[str], scores: dict[str, dict[str, float]], out: Path
) -> None:
    """An n_layer x n_head grid of causal attention maps on one passage (shared 0-1 colour scale), each titled with
    its head's previous-token and induction scores, the passage's tokens along the bottom-left map.

    The grid is drawn as one mosaic image on one axes (maps separated by a blank band) rather than a subplot per
    head: matplotlib's cost is per axes and per tick label. Each map is sized so that its token labels are legible
    at the PNG's own size: :data:`TOKEN_INCHES` a token, for a label of :data:`LABEL_POINTS`."""
    n_layer, n_head, T = maps.shape[0], maps.shape[1], maps.shape[-1]
    # Blank (NaN) rows between map rows hold each head's title; a thinner blank column separates the heads.
    row, col = T + max(3, round(T * 0.2)), T + max(1, round(T * 0.06))
    mosaic = np.full((n_layer * row, n_head * col), np.nan, dtype=np.float32)
    top = row - T
    for layer in range(n_layer):
        for head in range(n_head):
            mosaic[layer * row + top : (layer + 1) * row, head * col : head * col + T] = maps[layer, head]
    fig, ax = plt.subplots(figsize=(TOKEN_INCHES * n_head * col + 1.6, TOKEN_INCHES * n_layer * row + 1.2))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for layer in range(n_layer):
        for head in range(n_head):
            s = scores.get(f"L{layer}.H{head}", {})
            title = f"L{layer}.H{head}  prev {s.get('prev_token', 0):.2f}  ind {s.get('induction', 0):.2f}"
            ax.text(head * col + T / 2 - 0.5, layer * row + top - 1, title, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(T), labels, fontsize=LABEL_POINTS, rotation=90, fontfamily="monospace")
    bottom = (n_layer - 1) * row + top
    ax.set_yticks(range(bottom, bottom + T), labels, fontsize=LABEL_POINTS, fontfamily="monospace")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"{name}: attention (rows: query, columns: key)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    save_figure(fig, out)


# ----------------------------------------------------------------------------------------------
# training health


def weight_kind(param: str) -> str:
    """A weight's role, its name with the layer index starred: 'transformer.h.3.attn.c_attn.weight' ->
    'h.*.attn.c_attn' (one colour per role, whatever the depth)."""
    kind = re.sub(r"(^|\.)\d+(?=\.)", r"\1*", param).removesuffix(".weight")
    return kind.removeprefix("transformer.")


def _health_activations(ax, snaps: list[dict]) -> None:
    for j, r in enumerate([snaps[0], snaps[-1]] if len(snaps) > 1 else snaps):
        for color, (layer, h) in zip(COLORS, r["activations"].items()):
            edges = np.linspace(-h["limit"], h["limit"], len(h["counts"]) + 1)
            dens = np.array(h["counts"]) / max(1, sum(h["counts"]))
            sat = f", saturated {100 * h['saturated']:.1f}%" if "saturated" in h else ""
            ax.plot((edges[:-1] + edges[1:]) / 2, dens, color=color, ls="--" if j == 0 and len(snaps) > 1 else "-",
                    label=f"{layer} @ {r['step']}{sat}")  # fmt: skip
    ax.set(title="activations (dashed: first snapshot)", xlabel="value", ylabel="share")


def _health_gradients(ax, last: dict, kinds: dict[str, tuple]) -> None:
    params = list(last["gradients"])
    stds = [last["gradients"][p]["std"] for p in params]
    colors = [kinds[weight_kind(p)] for p in params]
    ax.barh(range(len(params)), stds, color=colors)
    ax.set_yticks(range(len(params)), [p.removeprefix("transformer.").removesuffix(".weight") for p in params],
                  fontsize=7)  # fmt: skip
    ax.invert_yaxis()
    ax.set(xscale="log", title=f"weight-gradient std per weight @ step {last['step']}", xlabel="std of the gradient")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labels at the powers of ten only: the others overlap


def _health_ratios(ax, records: list[dict], kinds: dict[str, tuple]) -> None:
    steps = np.array([r["step"] for r in records])
    for kind, color in kinds.items():
        params = [p for p in records[0]["update_ratio"] if weight_kind(p) == kind]
        ratios = np.array([[r["update_ratio"][p] for p in params] for r in records])  # (records, params)
        many = len(params) > 1
        ax.plot(steps, ratios.mean(1), color=color, label=f"{kind} (mean of {len(params)})" if many else kind)
        if many:
            ax.fill_between(steps, ratios.min(1), ratios.max(1), color=color, alpha=0.15, lw=0)
    ax.axhline(-3, color="k", ls="--", lw=1, label="1e-3 (makemore's rule of thumb)")
    ax.set(title="log10 update / data ratio (band: every layer)", xlabel="step", ylabel="log10 std(Δw) / std(w)")


def plot_health(name: str, records: list[dict], out: Path) -> None:
    """makemore lecture 4's three views of one run: activation histograms (first and last snapshot, with the tanh
    layers' saturated share), the weight gradients' spread per weight (last snapshot) and the log10 update/data
    ratio over training, one colour per weight role (its layers as a band)."""
    snaps = [r for r in records if "activations" in r]
    roles = list(dict.fromkeys(weight_kind(p) for p in records[0]["update_ratio"]))
    palette = COLORS if len(roles) <= len(COLORS) else plt.get_cmap("tab20").colors
    kinds = dict(zip(roles, palette))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    _health_activations(axes[0], snaps)
    _health_gradients(axes[1], snaps[-1], kinds)
    _health_ratios(axes[2], records, kinds)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{name}: training health", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out)


# ----------------------------------------------------------------------------------------------
# embeddings


def plot_embedding_pca(embeddings: dict[str, np.ndarray], labels: list[str], out: Path) -> None:
    """The Language modeling journey: character embeddings projected on their first two principal components."""
    fig, axes = plt.subplots(1, len(embeddings), figsize=(6 * len(embeddings), 5.6), squeeze=False)
    for ax, (name, emb) in zip(axes[0], embeddings.items()):
        x = emb.astype(np.float64) - emb.astype(np.float64).mean(0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T  # (V, 2)
        explained = float((s[:2] ** 2).sum() / (s**2).sum())
        ax.scatter(xy[:, 0], xy[:, 1], s=160, color=COLORS[0], alpha=0.35)
        for (px, py), lab in zip(xy, labels):
            ax.annotate(lab, (px, py), ha="center", va="center", fontsize=9)
        ax.set(title=f"{name}: embeddings, PCA ({100 * explained:.0f}% of variance)", xlabel="PC 1", ylabel="PC 2")
        ax.grid(alpha=0.3)
    save_figure(fig, out)


# ----------------------------------------------------------------------------------------------
# which runs each figure shows


def _bigram_pair(study: StudyConfig) -> tuple[str, str] | None:
    """The first (counted, learned) pair of runs that share a char tokenizer, if any."""
    first: dict[tuple[str, str], str] = {}
    for name, run in study.runs.items():
        first.setdefault((run.tokenizer, run.model.family), name)
    for tok in dict.fromkeys(run.tokenizer for run in study.runs.values()):
        runs = [first.get((tok, family)) for family in BIGRAM_PAIR]
        if all(runs) and study.tokenizers[tok].kind == "char":
            return runs[0], runs[1]
    return None


def _embedding_runs(study: StudyConfig, lines_only: bool) -> list[str]:
    """Char runs of ``report.embedding_families`` (of a 'lines' corpus only, for the PCA of the names)."""
    return [
        n
        for n, r in study.runs.items()
        if r.model.family in study.report.embedding_families
        and study.tokenizers[r.tokenizer].kind == "char"
        and (study.corpus_of(n).format == "lines" or not lines_only)
    ]


def draw_inside(study: StudyConfig, metrics_dir: Path, inside_dir: Path, models_dir: Path, fig_dir: Path) -> dict:
    """Draw every inside-the-model figure the runs have data for; return what was drawn: 'attention' and 'health'
    (run names), 'bigram_heatmaps', 'embedding_similarity', 'embedding_pca' (present when drawn)."""
    arrays = {n: read_arrays(inside_dir / f"{n}.safetensors") for n in study.runs}
    drawn: dict[str, list[str]] = {"attention": [], "health": []}
    for name in study.runs:
        heads = json.loads((metrics_dir / f"{name}.json").read_text()).get("heads")
        a = arrays[name]
        if heads and "attention" in a.tensors:
            plot_attention_grid(
                name, a.tensors["attention"], a.passage_labels, heads, fig_dir / f"attention-{name}.png"
            )
            drawn["attention"].append(name)
        if (health := models_dir / name / "health.json").exists():
            plot_health(name, json.loads(health.read_text())["records"], fig_dir / f"health-{name}.png")
            drawn["health"].append(name)
    if pair := _bigram_pair(study):
        counted, learned = (arrays[n] for n in pair)
        plot_bigram_heatmaps(counted.tensors["next_token_probs"], learned.tensors["next_token_probs"],
                             counted.vocab_labels, fig_dir / "bigram_heatmaps.png")  # fmt: skip
        drawn["bigram_heatmaps"] = list(pair)
    for key, lines_only, plot in [
        ("embedding_similarity", False, plot_embedding_similarity),
        ("embedding_pca", True, plot_embedding_pca),
    ]:
        if runs := _embedding_runs(study, lines_only):
            embeddings = {n: arrays[n].tensors["token_embedding"] for n in runs}
            plot(
                embeddings,
                arrays[runs[-1 if key == "embedding_similarity" else 0]].vocab_labels,
                fig_dir / f"{key}.png",
            )
            drawn[key] = runs
    return drawn
