"""The study's report: a pandas run table and matplotlib figures, written as reports/README.md + PNGs
that read offline on a repository page (no JavaScript, no internet)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lm.config import StudyConfig  # noqa: E402
from lm.generate import parse_samples  # noqa: E402
from lm.io import atomic_write_text  # noqa: E402
from lm.models import COMPONENTS  # noqa: E402

FIGURES = {
    "embedding_pca": "Character embeddings in two dimensions (PCA)",
    "loss_curves": "Loss curves per corpus",
    "bigram_heatmaps": "Names bigram table: counted vs learned",
    "embedding_similarity": "Character-embedding cosine similarity",
    "param_shares": "Where the parameters are",
    "bpc_vs_params": "Bits per character against parameter count",
}


def run_table(study: StudyConfig, metrics_dir: Path) -> pd.DataFrame:
    """One row per run, in params.yaml order, from metrics/<run>.json. The cost of a run is its training
    tokens and FLOPs (6N + attention per token, lm.model_size): numbers a rerun reproduces, unlike wall-clock
    time, which MLflow records."""
    from lm.model_size import param_report

    rows = []
    for name, run in study.runs.items():
        m = json.loads((metrics_dir / f"{name}.json").read_text())
        flops = param_report(run.model, m["vocab_size"]).flops_per_token
        tok = study.tokenizers[run.tokenizer]
        rows.append(
            {
                "run": name,
                "corpus": tok.corpus,
                "tokenizer": run.tokenizer,
                "family": run.model.family,
                "params": m["params"],
                "val loss": m["val/loss"],
                "val bpc": m["val/bpc"],
                "val ppl": m["val/ppl"],
                "test loss": m.get("test/loss", math.nan),
                "steps": m["train/steps"],
                "selected step": m.get("train/selected_step", m["train/steps"]),
                "train tokens": m["train/tokens"],
                "train FLOPs": math.nan if flops is None else float(flops) * m["train/tokens"],
                "params_by_component": m["params_by_component"],
            }
        )
    return pd.DataFrame(rows)


def _params_label(n: int, family: str) -> str:
    return f"{n:,} n-gram entries" if family == "ngram" else f"{n:,}"  # an n-gram's stored entries, not weights


def _selected_label(selected: int, steps: int) -> str:
    """The checkpoint's step as the run table shows it: 'counted' (no steps), '2,000 (last)', '1,750 of 2,000'."""
    if steps == 0:
        return "counted"
    return f"{steps:,} (last)" if selected == steps else f"{selected:,} of {steps:,}"


def _markdown_table(df: pd.DataFrame) -> str:
    shown = df.drop(columns=["params_by_component"]).copy()
    shown["params"] = [_params_label(n, f) for n, f in zip(shown["params"], shown["family"])]
    shown["train tokens"] = shown["train tokens"].map("{:,}".format)
    shown["selected step"] = [_selected_label(sel, n) for sel, n in zip(shown["selected step"], shown["steps"])]
    shown = shown.drop(columns=["steps"]).rename(columns={"selected step": "checkpoint step"})
    for col, fmt in [
        ("val loss", "{:.4f}"),
        ("val bpc", "{:.4f}"),
        ("val ppl", "{:.2f}"),
        ("test loss", "{:.4f}"),
        ("train FLOPs", "{:.3g}"),
    ]:
        shown[col] = shown[col].map(lambda v, f=fmt: "" if pd.isna(v) else f.format(v))
    return shown.to_markdown(index=False)


def save_figure(fig, path: Path) -> None:
    """Write `fig` to `path` as a PNG with reproducible bytes (no timestamp), through a temp file, and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})  # no timestamps: reproducible bytes
    plt.close(fig)
    tmp.replace(path)


def plot_loss_curves(study: StudyConfig, curves_dir: Path, selected: dict[str, int], out: Path) -> None:
    """Val and train loss per step, one panel per corpus, with a ring on the step each checkpoint holds."""
    corpora = list(dict.fromkeys(study.tokenizers[r.tokenizer].corpus for r in study.runs.values()))
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for i, (name, run) in enumerate(study.runs.items()):
            if study.tokenizers[run.tokenizer].corpus != corpus:
                continue
            c = pd.read_csv(curves_dir / f"{name}.csv")
            color = f"C{i % 10}"
            if len(c) == 1:  # fitted by counting: one point, drawn as a level
                ax.axhline(c["val_loss"].iloc[0], color=color, ls=":", label=f"{name} (counted)")
                continue
            ax.plot(c["step"], c["val_loss"], color=color, label=name)
            ax.plot(c["step"], c["train_loss"], color=color, ls="--", alpha=0.5)
            picked = c[c["step"] == selected[name]]  # the step whose weights the checkpoint holds (train.keep)
            ax.plot(picked["step"], picked["val_loss"], "o", color=color, ms=6, mfc="none", mew=1.5)
        ax.set(
            title=f"{corpus}: val (solid), train (dashed), ○ selected checkpoint",
            xlabel="step",
            ylabel="loss (nats/token)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out)


def _char_labels(tokenizer, vocab_size: int) -> list[str]:
    return [repr(tokenizer.decode([i]))[1:-1] or "·" for i in range(vocab_size)]


def plot_bigram_heatmaps(counted: torch.Tensor, learned: torch.Tensor, labels: list[str], out: Path) -> None:
    """Seed 000 figs. 1-2: P(next | current) from counts and from gradient descent, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(16, 7.6))
    vmax = float(max(counted.max(), learned.max()))  # one colour scale, so the two tables compare
    for ax, probs, title in [
        (axes[0], counted, "counted (+k smoothing)"),
        (axes[1], learned, "learned by gradient descent"),
    ]:
        im = ax.imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set(title=f"P(next | current): {title}", xlabel="next", ylabel="current")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, out)


def plot_embedding_similarity(embeddings: dict[str, torch.Tensor], labels: list[str], out: Path) -> None:
    """Seed 000 figs. 3 and 5: cosine similarity between learned character embeddings."""
    fig, axes = plt.subplots(1, len(embeddings), figsize=(7.5 * len(embeddings), 6.6), squeeze=False)
    for ax, (name, emb) in zip(axes[0], embeddings.items()):
        e = torch.nn.functional.normalize(emb.float(), dim=1)
        im = ax.imshow((e @ e.T).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{name}: cosine similarity of embeddings")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, out)


def plot_param_shares(shares: dict[str, dict[str, int]], out: Path) -> None:
    """Stacked bars: the share of each component in every model's parameters."""
    names = list(shares)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    left = np.zeros(len(names))
    for j, comp in enumerate(COMPONENTS):
        frac = np.array([shares[n].get(comp, 0) / max(1, sum(shares[n].values())) for n in names])
        if frac.any():
            ax.barh(names, frac, left=left, color=f"C{j}", label=comp.replace("_", " "))
            left += frac
    ax.invert_yaxis()
    ax.set(xlabel="share of parameters", xlim=(0, 1))
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    save_figure(fig, out)


def plot_bpc_vs_params(table: pd.DataFrame, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (corpus, g) in enumerate(table.groupby("corpus", sort=False)):
        ax.scatter(g["params"], g["val bpc"], color=f"C{i}", label=corpus, s=36)
        for _, r in g.iterrows():
            ax.annotate(
                r["run"].removeprefix(f"{corpus}-"),
                (r["params"], r["val bpc"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    ax.set(xscale="log", xlabel="parameters", ylabel="val bits per character", title="The ladder: bpc against size")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, out)


def write_report(
    study: StudyConfig,
    metrics_dir: Path,
    curves_dir: Path,
    models_dir: Path,
    tokenizers_dir: Path,
    samples_dir: Path,
    out_dir: Path,
) -> pd.DataFrame:
    """Write out_dir/README.md, out_dir/runs.csv and out_dir/figures/*.png; return the run table."""
    fig_dir = out_dir / "figures"
    table = run_table(study, metrics_dir)
    plot_loss_curves(study, curves_dir, dict(zip(table["run"], table["selected step"])), fig_dir / "loss_curves.png")
    plot_bpc_vs_params(table, fig_dir / "bpc_vs_params.png")
    shares = dict(zip(table["run"], table["params_by_component"]))
    shares.update(reference_shares())
    plot_param_shares(shares, fig_dir / "param_shares.png")
    made = ["loss_curves", "bpc_vs_params", "param_shares"]
    weights = _Weights(models_dir, tokenizers_dir)
    if pair := _bigram_pair(study):
        (counted, labels), (learned, _) = weights.load(pair[0]), weights.load(pair[1])
        plot_bigram_heatmaps(
            _next_token_probs(counted), _next_token_probs(learned), labels, fig_dir / "bigram_heatmaps.png"
        )
        made.append("bigram_heatmaps")
    emb_runs = [
        n
        for n, r in study.runs.items()
        if r.model.family in study.report.embedding_families and study.tokenizers[r.tokenizer].kind == "char"
    ]
    if emb_runs:
        loaded = {n: weights.load(n) for n in emb_runs}
        embeddings = {n: token_embedding(model) for n, (model, _) in loaded.items()}
        plot_embedding_similarity(embeddings, loaded[emb_runs[-1]][1], fig_dir / "embedding_similarity.png")
        made.append("embedding_similarity")

    inside = _inside_figures(study, metrics_dir, models_dir, tokenizers_dir, fig_dir, weights)
    if inside.pop("embedding_pca", None):
        made.append("embedding_pca")

    table.drop(columns=["params_by_component"]).to_csv(out_dir / "runs.csv", index=False, float_format="%.6g")
    anchors = published_anchors(study, tokenizers_dir) + ngram_anchors(study, table)
    atomic_write_text(out_dir / "README.md", _markdown(study, table, made, anchors, samples_dir, metrics_dir, inside))
    return table


class _Weights:
    """Trained checkpoints for the figures that show weights, with their tokenizer's token labels."""

    def __init__(self, models_dir: Path, tokenizers_dir: Path):
        self.models_dir, self.tokenizers_dir = models_dir, tokenizers_dir
        self._labels: dict[str, list[str]] = {}

    def load(self, run_name: str) -> tuple[torch.nn.Module, list[str]]:
        from lm import checkpoint
        from lm.tokenizer import load_tokenizer

        model, run, vocab_size = checkpoint.load(self.models_dir / run_name)
        if run.tokenizer not in self._labels:
            tokenizer = load_tokenizer(self.tokenizers_dir / run.tokenizer)
            self._labels[run.tokenizer] = _char_labels(tokenizer, vocab_size)
        return model, self._labels[run.tokenizer]


BIGRAM_PAIR = ("bigram_counts", "bigram_nn")
"""The counted and the learned table of seed 000's figs. 1-2: two runs of these families on one char tokenizer."""


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


@torch.no_grad()
def _next_token_probs(model: torch.nn.Module) -> torch.Tensor:
    """P(next | current) for every current token of a bigram model: (V, V)."""
    logits, _ = model(torch.arange(model.vocab_size)[:, None])  # (V, 1) ids -> (V, 1, V)
    return torch.softmax(logits[:, 0].float(), dim=-1)


def token_embedding(model: torch.nn.Module) -> torch.Tensor:
    """The model's token-embedding matrix (the parameter its family maps to 'token_embedding')."""
    for name, p in model.named_parameters():
        if model.component_of(name) == "token_embedding":
            return p.detach()
    raise ValueError("model has no token embedding")


def reference_shares() -> dict[str, dict[str, int]]:
    """GPT-2 small as seed 003 counts it (lm.model_size, on the meta device): untied as configured
    (163,009,536) and with the head tied to the token embedding (124,412,160; the model whose shares
    seed 003 quotes: token embedding 31 %, feed-forward 45 %, attention 23 %)."""
    from lm.model_size import report_for

    r = report_for("gpt2-small")
    return {"gpt2-small (reference, untied)": r.untied.components, "gpt2-small (reference, tied)": r.tied.components}


MAKEMORE_BIGRAM_NLL = {1.0: 2.4544, 0.0: 2.4541}
"""makemore lecture 1: NLL of the count bigram over every bigram of names.txt (+1 smoothing; unsmoothed as
measured in STUDY.md), summed one float32 log-probability at a time."""


def published_anchors(study: StudyConfig, tokenizers_dir: Path) -> list[str]:
    """Published numbers recomputed on the real corpora, as markdown table rows: makemore's count bigram over
    all bigrams of names.txt (every split), for each counting run on a char tokenizer of a 'lines' corpus."""
    from lm.batches import Batches
    from lm.metrics import score
    from lm.models import build_model
    from lm.tokenizer import load_ids, load_stats

    rows = []
    for name, run in study.runs.items():
        tok = study.tokenizers[run.tokenizer]
        smoothing = getattr(run.model, "smoothing", None)
        if run.model.family != "bigram_counts" or tok.kind != "char" or study.corpus_of(name).format != "lines":
            continue
        stats = load_stats(tokenizers_dir / run.tokenizer)
        model = build_model(run.model, int(stats["vocab_size"]))
        ids = [load_ids(tokenizers_dir / run.tokenizer, split) for split in stats["splits"]]
        splits = [Batches(i, "lines", 0, boundary_id=stats["boundary_id"]) for i in ids]
        for batches in splits:
            for x, y in batches.iterate(4096):
                model.accumulate(x, y)
        scored = [score(model, batches.iterate(4096)) for batches in splits]
        total, count = sum(t for t, _ in scored), sum(c for _, c in scored)
        published = MAKEMORE_BIGRAM_NLL.get(smoothing)
        rows.append(
            f"| {name}: count bigram (smoothing {smoothing:g}) over all {count:,} bigrams of {tok.corpus} "
            f"| {total / count:.6f} | {'' if published is None else f'{published} (makemore, float32 sum)'} |"
        )
    return rows


def ngram_orders(study: StudyConfig, table: pd.DataFrame) -> str:
    """Markdown: per tokenizer with n-gram runs, order against entries, val loss and bpc (and test loss)."""
    orders = {name: run.model.order for name, run in study.runs.items() if run.model.family == "ngram"}
    if not orders:
        return ""
    rows = table[table["run"].isin(list(orders))].assign(order=lambda d: d["run"].map(orders))
    out = []
    for tok, g in rows.groupby("tokenizer", sort=False):
        g = g.sort_values("order")
        best = g.loc[g["val bpc"].idxmin(), "order"]
        shown = pd.DataFrame(
            {
                "order": [f"**{o}**" if o == best else str(o) for o in g["order"]],
                "n-gram entries": g["params"].map("{:,}".format),
                "val loss": g["val loss"].map("{:.4f}".format),
                "val bpc": g["val bpc"].map("{:.4f}".format),
                "test loss": g["test loss"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}"),
            }
        )
        out += [f"**{tok}** (best val bpc in bold)", "", shown.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(out)


def _change(before: dict, after: dict) -> str:
    """What differs between two model configs, as 'key: old → new' (the family named only when it changes)."""
    show = lambda v: "default" if v is None else str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    changed = [k for k, v in after.items() if k != "family" and before.get(k) != v]
    diffs = [f"{k}: {show(before.get(k))} → {show(after[k])}" for k in changed]
    diffs = [d for d in diffs if not d.endswith("→ default")]  # a switch the new family fixes, not a change
    if before.get("family") != after.get("family"):
        diffs.append(f"(family {after['family']})")
    return ", ".join(diffs) or "none"


def ablation_table(study: StudyConfig, table: pd.DataFrame) -> str:
    """Markdown: the runs of ``report.ablation`` in order, what each changes against the row before, and what
    that buys in params, val loss and bpc (tokens/s is wall-clock: ``python -m bench.train --ablation``)."""
    names = study.report.ablation
    if not names:
        return ""
    rows = table.set_index("run").loc[names]
    lines = ["| run | change against the row above | params | val loss | Δ val loss | val bpc | Δ bpc |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    prev = None
    for name in names:
        r, model = rows.loc[name], study.runs[name].model.model_dump()
        if prev is None:
            change, d_loss, d_bpc, params = "baseline", "", "", f"{r['params']:,}"
        else:
            p = rows.loc[prev]
            change = _change(study.runs[prev].model.model_dump(), model)
            d_loss, d_bpc = f"{r['val loss'] - p['val loss']:+.4f}", f"{r['val bpc'] - p['val bpc']:+.4f}"
            params = f"{r['params']:,} ({(r['params'] - p['params']) / p['params']:+.1%})"
        cells = [name, change, params, f"{r['val loss']:.4f}", d_loss, f"{r['val bpc']:.4f}", d_bpc]
        lines.append("| " + " | ".join(cells) + " |")
        prev = name
    return "\n".join(lines)


def anchor_table(study: StudyConfig, metrics_dir: Path) -> str:
    """Markdown: each `report.anchors` entry, its source, the target, ours, the difference and the verdict (met,
    missed, or partial when the run trained fewer steps than the source, e.g. a GPU-scale run cut short on a CPU)."""
    if not study.report.anchors:
        return ""
    lines = ["| anchor | source | run | steps | target | ours | ours − target | verdict |",
             "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for a in study.report.anchors:
        m = json.loads((metrics_dir / f"{a.run}.json").read_text())
        ours, steps = m[a.metric], int(m["train/steps"])
        sel = m.get("train/selected_step", steps)
        if a.steps and steps < a.steps:
            verdict = f"partial: {steps:,} of the source's {a.steps:,} steps"
        else:
            verdict = "**met**" if ours <= a.target else "missed"
        shown = f"{sel:,} of {steps:,}" if sel != steps else f"{steps:,}"
        lines.append(
            f"| {a.metric} | {a.source} | {a.run} | {shown} | {a.target:.4f} | {ours:.4f} | {ours - a.target:+.4f} "
            f"| {verdict} |"
        )
    return "\n".join(lines)


def per_token_table(study: StudyConfig, table: pd.DataFrame) -> str:
    """Markdown: per `report.per_token` reference, every run of its corpus in tokens, per-token ppl and bpc, and
    the characters per token the reference's tokenizer would need for its ppl to equal that run's bpc."""
    out = []
    for ref in study.report.per_token:
        bits = math.log2(ref.ppl)
        rows = table[table["corpus"] == ref.corpus]
        lines = [
            f"**{ref.corpus}**: {ref.source}: perplexity {ref.ppl:g} per token = {bits:.3f} bits per token, of a "
            "tokenizer whose characters per token are not published. It equals a run's bpc only if its tokens "
            "average (bits per token ÷ bpc) characters: the last column. Per-token ppl compares only within one "
            "tokenizer.",
            "",
            "| run | tokenizer | val ppl (per token) | val bpc | chars/token the reference needs to match |",
            "|---|---|---:|---:|---:|",
        ]
        for _, r in rows.iterrows():
            lines.append(
                f"| {r['run']} | {r['tokenizer']} | {r['val ppl']:.2f} | {r['val bpc']:.4f} "
                f"| {bits / r['val bpc']:.2f} |"
            )
        out += lines + [""]
    return "\n".join(out)


EUREKA_NGRAM_TEST = 2.106
"""EurekaLabsAI/ngram: a 4-gram with add-k smoothing on names, test loss 2.106 nats (STUDY.md)."""


def ngram_anchors(study: StudyConfig, table: pd.DataFrame) -> list[str]:
    """The names 4-gram's published test loss against our Kneser–Ney 4-gram's, as markdown table rows."""
    rows = []
    for name, run in study.runs.items():
        if run.model.family != "ngram" or run.model.order != 4 or study.corpus_of(name).format != "lines":
            continue
        test = table.set_index("run").loc[name, "test loss"]
        rows.append(
            f"| {name}: Kneser–Ney 4-gram, test loss on {study.tokenizers[run.tokenizer].corpus} | {test:.4f} "
            f"| {EUREKA_NGRAM_TEST} (EurekaLabsAI/ngram: 4-gram, add-k smoothing) |"
        )
    return rows


def _markdown(
    study: StudyConfig,
    table: pd.DataFrame,
    made: list[str],
    anchors: list[str],
    samples_dir: Path,
    metrics_dir: Path,
    inside: dict[str, list[str]] | None = None,
) -> str:
    inside = inside or {}
    lines = [
        f"# {study.report.title}",
        "",
        "Generated by `dvc repro` (stage `report`) from `metrics/*.json`, `curves/*.csv` and the checkpoints; "
        "do not edit by hand. Metric definitions: loss = mean NLL in nats per token over the whole split "
        "in fixed order; ppl = exp(loss) (per token, not comparable across tokenizers); "
        "bpc = total nats / (ln 2 × characters), comparable across tokenizers. Training cost is given in "
        "target tokens and FLOPs (6N + 12·n_layer·n_embd·ctx per token, N without the embedding lookups: a "
        "bigram_nn table is all lookup, so 0; a counted table takes none), which a rerun reproduces; "
        "wall-clock times are in MLflow (`make ui`).",
        "",
        "## Runs",
        "",
        _markdown_table(table),
        "",
    ]
    if anchors:
        lines += ["## Published numbers", "", "| what | this study (nats) | published |", "|---|---|---|", *anchors, ""]
    if anchor_rows := anchor_table(study, metrics_dir):
        lines += [
            "## Seed anchors",
            "",
            "Each source's number beside ours from the run that reproduces its configuration (whole split, the "
            "checkpoint `train.keep` selected). Selection looks at a fixed val subset, so a val number is slightly "
            "optimistic; where a split has a test part, the test number is the unbiased one.",
            "",
            anchor_rows,
            "",
        ]
    if per_token := per_token_table(study, table):
        lines += ["## Per-token numbers of other tokenizers, in bits per character", "", per_token]
    if orders := ngram_orders(study, table):
        lines += [
            "## N-gram order against val bpc",
            "",
            "Interpolated modified Kneser–Ney (Chen & Goodman 1998), counted on the training split in one pass; "
            'its "parameters" are its stored n-gram entries over all orders. The best order is picked on val, '
            "so its val number is optimistic; names has a test split for the unbiased one.",
            "",
            orders,
        ]
    if ablation := ablation_table(study, table):
        lines += [
            "## What each change buys",
            "",
            "From GPT-2's block to LLaMA's, one change per row, every row trained with the same settings (the "
            "runs' `train`, shorter than shakespeare-gpt's). Δ is against the row above, from one seed each: a "
            "run's val loss moves with its seed, so read Δ against that spread, which `python -m bench.seeds "
            "--ablation` measures by training every row again over five seeds (the default ladder's: "
            "[seeds/ablation.md](seeds/ablation.md)). Throughput is wall-clock, so it is not here: "
            "`python -m bench.train --ablation` measures tokens/s per row ([bench.md](bench.md)).",
            "",
            ablation,
            "",
        ]
    for key in made:
        lines += [f"## {FIGURES[key]}", "", f"![{FIGURES[key]}](figures/{key}.png)", ""]
    if heads := heads_table(study, metrics_dir):
        lines += [
            "## Attention: what each head looks at",
            "",
            "Per head of every attention run (lm/inspection.py): the **previous-token** score, its mean attention from "
            "each position to the one before, on val text; and the **induction** score (Olsson et al. 2022's prefix "
            "matching), its mean attention from each token of a repeated random sequence's second half to the token "
            "that followed the same token in the first half. 1.0 is a pure head of that kind.",
            "",
            heads,
        ]
        for name in inside.get("attention", []):
            lines += [f"![{name}: attention](figures/attention-{name}.png)", ""]
    if inside.get("health"):
        lines += [
            "## Training health",
            "",
            "As makemore part 4 diagnoses a net (runs with `train.health_every`): activation histograms per layer at "
            "the first and last step (tanh layers with their saturated share, |t| > 0.97), weight-gradient histograms "
            "at the last step, and the log10 ratio of each update to its weights over training (makemore's rule of "
            "thumb: about -3).",
            "",
        ]
        lines += [line for name in inside["health"] for line in (f"![{name}: health](figures/health-{name}.png)", "")]
    if quality := quality_table(study, metrics_dir):
        e = study.evaluate
        lines += [
            "## Generation quality beyond perplexity",
            "",
            f"Each text run continues {e.quality_prompts} fixed val prompts of {e.prompt_chars} characters by "
            f"{e.continuation_chars} characters, greedily and with the evaluate sampling settings (temperature "
            f"{e.temperature:g}, top-k {e.top_k or 'off'}). BLEU and chrF (sacrebleu, 0-100) compare each continuation "
            "with the true one; distinct-1/2 are the unique share of word uni/bigrams (Li et al. 2016); the copy rate "
            "is the share of generated 8-character strings found verbatim in the training split (memorisation; the "
            "true continuations' own rate is the baseline). Seed 002 reports BLEU "
            f"{BLEU_SEED002} for its Oz model: its own split, tokenizer and protocol (and scale), so it is cited "
            "here as its number, not compared with these.",
            "",
            quality,
            "",
        ]
    if study.report.samples_per_run:
        lines += ["## Samples", ""]
        for name in study.runs:
            path = samples_dir / f"{name}.txt"
            if not path.exists():
                continue
            fmt = study.corpus_of(name).format
            texts = parse_samples(path.read_text(), fmt)
            if fmt == "lines":
                names = [t for t in texts if t][: study.report.samples_per_run]  # an empty name shows as nothing
                lines += [f"**{name}**: {', '.join(names)}", ""]
            else:
                lines += [f"**{name}**", "", "```text", texts[0].rstrip(), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# inside the models (lm/inspection.py): attention, head roles, training health, embeddings in 2-D, generation


def attention_passage(study: StudyConfig, run_name: str, tokenizers_dir: Path, length: int) -> np.ndarray:
    """The fixed val passage whose attention the report draws: `length` token ids of the run's val split, from the
    first line start at or after character `report.attention_offset` (the same place for every run of a corpus)."""
    from lm.tokenizer import load_ids, load_tokenizer

    run = study.runs[run_name]
    tok_dir = tokenizers_dir / run.tokenizer
    ids = np.asarray(load_ids(tok_dir, "val"), dtype=np.int64)
    tokenizer = load_tokenizer(tok_dir)
    text = tokenizer.decode(ids.tolist())
    offset = min(study.report.attention_offset, max(0, len(text) - 1))
    nl = text.find("\n", offset)
    start_char = nl + 1 if 0 <= nl < len(text) - 1 else offset
    # The token where that character falls: the token count of the text before it.
    start = len(tokenizer.encode(text[:start_char]).ids) if start_char else 0
    start = min(start, max(0, len(ids) - length))
    return ids[start : start + length]


def plot_attention_grid(
    name: str, maps: list[torch.Tensor], labels: list[str], scores: dict[str, dict[str, float]], out: Path
) -> None:
    """An n_layer x n_head grid of causal attention maps on one passage (shared 0-1 colour scale), each titled with
    its head's previous-token and induction scores; tokens on the axes when the passage is short enough.

    The grid is drawn as one mosaic image on one axes (maps separated by a blank line) rather than a subplot per
    head: matplotlib's cost is per axes and per tick label."""
    n_layer, n_head, T = len(maps), maps[0].size(1), maps[0].size(-1)
    # Blank (NaN) rows between map rows hold each head's title; a thinner blank column separates the heads.
    row, col = T + max(2, round(T * 0.16)), T + max(1, round(T * 0.05))
    mosaic = np.full((n_layer * row, n_head * col), np.nan, dtype=np.float32)
    top = row - T
    for layer, att in enumerate(maps):
        for head in range(n_head):
            mosaic[layer * row + top : (layer + 1) * row, head * col : head * col + T] = att[0, head].numpy()
    size = 2.6 if T <= 32 else 2.2
    fig, ax = plt.subplots(figsize=(size * n_head + 1.2, size * n_layer + 0.6))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for layer in range(n_layer):
        for head in range(n_head):
            s = scores.get(f"L{layer}.H{head}", {})
            title = f"L{layer}.H{head}  prev {s.get('prev_token', 0):.2f}  ind {s.get('induction', 0):.2f}"
            ax.text(head * col + T / 2 - 0.5, layer * row + top - 1, title, ha="center", va="bottom", fontsize=7)
    # Tokens along the bottom-left map (every map shows the same passage), where they fit: labelling every row and
    # column of maps drew 4x the text, and text is most of a figure's drawing time.
    fits = len(labels) <= 32
    ax.set_xticks(range(T) if fits else [], labels if fits else [], fontsize=5, rotation=90)
    bottom = (n_layer - 1) * row + top
    ax.set_yticks(range(bottom, bottom + T) if fits else [], labels if fits else [], fontsize=5)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"{name}: attention (rows: query, columns: key)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    save_figure(fig, out)


def heads_table(study: StudyConfig, metrics_dir: Path) -> str:
    """Markdown: per attention run, its clearest previous-token and induction heads (from the numbers), then every
    head's two scores, layer by layer."""
    out = []
    for name in study.runs:
        heads = json.loads((metrics_dir / f"{name}.json").read_text()).get("heads")
        if not heads:
            continue
        from lm.inspection import clearest_heads

        best = clearest_heads(heads)
        (p_head, p), (i_head, i) = best["prev_token"], best["induction"]
        half = study.runs[name].model.block_size // 2
        chance = sum(1 / (t + 1) for t in range(half, 2 * half)) / half  # a head attending uniformly to the past
        out += [
            f"**{name}**: its clearest previous-token head is {p_head} ({p:.2f} of its attention on the token before) "
            f"and its clearest induction head {i_head} ({i:.3f} on the token after the current token's earlier "
            f"occurrence, on repeated random tokens; uniform attention would give {chance:.3f}).",
            "",
            "| head | " + " | ".join(heads) + " |",
            "|---|" + "---:|" * len(heads),
            "| previous-token | " + " | ".join(f"{s['prev_token']:.2f}" for s in heads.values()) + " |",
            "| induction | " + " | ".join(f"{s['induction']:.2f}" for s in heads.values()) + " |",
            "",
        ]
    return "\n".join(out)


def plot_health(name: str, records: list[dict], out: Path) -> None:
    """makemore part 4's three views of one run: activation histograms (first and last snapshot, with the tanh
    layers' saturated share), weight-gradient histograms (last snapshot) and log10 update/data ratio per weight."""
    snaps = [r for r in records if "activations" in r]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for j, r in enumerate([snaps[0], snaps[-1]] if len(snaps) > 1 else snaps):
        for i, (layer, h) in enumerate(r["activations"].items()):
            edges = np.linspace(-h["limit"], h["limit"], len(h["counts"]) + 1)
            mids = (edges[:-1] + edges[1:]) / 2
            dens = np.array(h["counts"]) / max(1, sum(h["counts"]))
            sat = f", saturated {100 * h['saturated']:.1f}%" if "saturated" in h else ""
            axes[0].plot(mids, dens, color=f"C{i}", ls="--" if j == 0 and len(snaps) > 1 else "-",
                         label=f"{layer} @ {r['step']}{sat}")  # fmt: skip
    axes[0].set(title="activations (dashed: first snapshot)", xlabel="value", ylabel="share")
    last = snaps[-1]
    for i, (param, h) in enumerate(last["gradients"].items()):
        edges = np.linspace(-h["limit"], h["limit"], len(h["counts"]) + 1)
        axes[1].plot((edges[:-1] + edges[1:]) / 2, np.array(h["counts"]) / max(1, sum(h["counts"])), color=f"C{i}",
                     label=f"{param} (std {h['std']:.1e})")  # fmt: skip
    axes[1].set(title=f"weight gradients @ step {last['step']}", xlabel="gradient", ylabel="share")
    steps = [r["step"] for r in records]
    for i, param in enumerate(records[0]["update_ratio"]):
        axes[2].plot(steps, [r["update_ratio"][param] for r in records], color=f"C{i % 10}", label=param)
    axes[2].axhline(-3, color="k", ls="--", lw=1, label="1e-3 (makemore's rule of thumb)")
    axes[2].set(title="log10 update / data ratio", xlabel="step", ylabel="log10 std(Δw) / std(w)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{name}: training health", fontsize=10)
    save_figure(fig, out)


def plot_embedding_pca(embeddings: dict[str, torch.Tensor], labels: list[str], out: Path) -> None:
    """Seed 000: the character embeddings projected on their first two principal components, one panel per run."""
    fig, axes = plt.subplots(1, len(embeddings), figsize=(6 * len(embeddings), 5.6), squeeze=False)
    for ax, (name, emb) in zip(axes[0], embeddings.items()):
        x = emb.float() - emb.float().mean(0)
        _, s, v = torch.linalg.svd(x, full_matrices=False)
        xy = (x @ v[:2].T).numpy()  # (V, 2)
        explained = float((s[:2] ** 2).sum() / (s**2).sum())
        ax.scatter(xy[:, 0], xy[:, 1], s=160, color="C0", alpha=0.35)
        for (px, py), lab in zip(xy, labels):
            ax.annotate(lab, (px, py), ha="center", va="center", fontsize=9)
        ax.set(title=f"{name}: embeddings, PCA ({100 * explained:.0f}% of variance)", xlabel="PC 1", ylabel="PC 2")
        ax.grid(alpha=0.3)
    save_figure(fig, out)


BLEU_SEED002 = 0.25
"""Seed 002's BLEU of its Oz model's generations: its own corpus split, tokenizer and protocol, not ours."""


def quality_table(study: StudyConfig, metrics_dir: Path) -> str:
    """Markdown: per text run, BLEU and chrF of its greedy and sampled continuations of the fixed val prompts, and
    distinct-1/2 and the 8-gram copy rate of the sampled ones, beside the true continuations' own numbers."""
    rows, ref = [], {}
    for name in study.runs:
        q = json.loads((metrics_dir / f"{name}.json").read_text()).get("quality")
        if not q:
            continue
        g, s = q["greedy"], q["sampled"]
        ref[study.corpus_of(name).url] = (study.tokenizers[study.runs[name].tokenizer].corpus, q["reference"])
        rows.append(
            f"| {name} | {g['bleu']:.2f} | {g['chrf']:.1f} | {s['bleu']:.2f} | {s['chrf']:.1f} | {s['distinct_1']:.3f} "
            f"| {s['distinct_2']:.3f} | {s['copy_rate_8']:.3f} | {g['copy_rate_8']:.3f} |"
        )
    if not rows:
        return ""
    for corpus, r in ref.values():
        rows.append(f"| *true {corpus} continuations* | | | | | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} "
                    f"| {r['copy_rate_8']:.3f} | |")  # fmt: skip
    head = [
        "| run | greedy BLEU | greedy chrF | sampled BLEU | sampled chrF | sampled distinct-1 | sampled distinct-2 "
        "| sampled 8-gram copy rate | greedy 8-gram copy rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(head + rows)


def _inside_figures(
    study: StudyConfig, metrics_dir: Path, models_dir: Path, tokenizers_dir: Path, fig_dir: Path, weights
) -> dict[str, list[str]]:
    """Draw the attention grids (every run with head scores), the training-health figures (every run with a
    health.json) and the names embeddings' PCA; return which were drawn."""
    from lm.inspection import attention_maps

    drawn: dict[str, list[str]] = {"attention": [], "health": []}
    for name, run in study.runs.items():
        heads = json.loads((metrics_dir / f"{name}.json").read_text()).get("heads")
        if heads:
            model, labels = weights.load(name)
            ids = attention_passage(study, name, tokenizers_dir, min(run.model.block_size, 32))
            maps = attention_maps(model, torch.from_numpy(ids)[None])
            plot_attention_grid(name, maps, [labels[i] for i in ids], heads, fig_dir / f"attention-{name}.png")
            drawn["attention"].append(name)
        if (health := models_dir / name / "health.json").exists():
            plot_health(name, json.loads(health.read_text())["records"], fig_dir / f"health-{name}.png")
            drawn["health"].append(name)
    pca = [
        n for n, r in study.runs.items()
        if r.model.family in study.report.embedding_families and study.tokenizers[r.tokenizer].kind == "char"
        and study.corpus_of(n).format == "lines"
    ]  # fmt: skip
    if pca:
        loaded = {n: weights.load(n) for n in pca}
        plot_embedding_pca({n: token_embedding(m) for n, (m, _) in loaded.items()}, loaded[pca[0]][1],
                           fig_dir / "embedding_pca.png")  # fmt: skip
        drawn["embedding_pca"] = pca
    return drawn
