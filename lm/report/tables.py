"""The report's tables, as pandas frames and markdown: one row per run, the n-gram orders, the ablation, the source
anchors, the per-token references, the attention heads and generation quality. Every number is read from the
runs' metrics JSON (metrics/<run>.json); the published ones from lm/references.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from lm.classification import metrics_stem
from lm.config import StudyConfig
from lm.references import published


def read_metrics(metrics_dir: Path, run: str) -> dict:
    """metrics/<run>.json, as the evaluate stage wrote it (or a baseline stage: ``run`` its metrics_stem)."""
    return json.loads((metrics_dir / f"{run}.json").read_text())


def run_table(study: StudyConfig, metrics_dir: Path) -> pd.DataFrame:
    """One row per run, in params.yaml order, from metrics/<run>.json. The cost of a run is its training
    tokens and FLOPs (6N + attention per token, lm.model_size): numbers a rerun reproduces, unlike wall-clock
    time, which MLflow records."""
    from lm.model_size import param_report

    rows = []
    for name, run in study.runs.items():
        m = read_metrics(metrics_dir, name)
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
                "dtype": m.get("train/dtype", ""),  # the forward pass's in training (train.dtype: auto resolved)
                "val tokens per character": m["val/tokens"] / m["val/characters"],
                "params_by_component": m["params_by_component"],
            }
        )
    return pd.DataFrame(rows)


def params_label(n: int, family: str) -> str:
    """A run's size as the tables show it: an n-gram's stored entries are not weights, so they say so."""
    return f"{n:,} n-gram entries" if family == "ngram" else f"{n:,}"


def selected_label(selected: int, steps: int) -> str:
    """The checkpoint's step as the run table shows it: 'counted' (no steps), '2,000 (last)', '1,750 of 2,000'."""
    if steps == 0:
        return "counted"
    return f"{steps:,} (last)" if selected == steps else f"{selected:,} of {steps:,}"


def runs_markdown(df: pd.DataFrame) -> str:
    """The run table as markdown, with its numbers formatted."""
    shown = df.drop(columns=["params_by_component", "val tokens per character"]).copy()
    shown["params"] = [params_label(n, f) for n, f in zip(shown["params"], shown["family"])]
    shown["train tokens"] = shown["train tokens"].map("{:,}".format)
    shown["selected step"] = [selected_label(sel, n) for sel, n in zip(shown["selected step"], shown["steps"])]
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
    that buys in params, val loss and bpc (tokens/s is wall-clock: ``python -m bench.train_speed --ablation``)."""
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


def anchor_verdict(ours: float, target: float, tolerance: float | None, steps: int, source_steps: int | None) -> str:
    """'partial' when the run trained fewer steps than the source; a number to reproduce (a tolerance) is
    'reproduced' within it, else 'differs'; a bar to meet is 'met' at or below it, else 'missed'."""
    if source_steps and steps < source_steps:
        return f"partial: {steps:,} of the source's {source_steps:,} steps"
    if tolerance is not None:
        return "**reproduced**" if abs(ours - target) <= tolerance else "differs"
    return "**met**" if ours <= target else "missed"


def anchor_table(study: StudyConfig, metrics_dir: Path) -> str:
    """Markdown: each `report.anchors` entry, its source, the target, ours, the difference and the verdict."""
    if not study.report.anchors:
        return ""
    lines = ["| metric | source | run | steps | published | ours | ours − published | verdict |",
             "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for a in study.report.anchors:
        ref, m = a.reference, read_metrics(metrics_dir, a.run)
        ours, steps = m[ref.metric], int(m["train/steps"])
        sel = m.get("train/selected_step", steps)
        verdict = anchor_verdict(ours, ref.value, ref.tolerance, steps, ref.steps)
        shown = selected_label(sel, steps)
        source = f"[{ref.source}]({ref.url})" if ref.url else ref.source
        note = f"; {a.note}" if a.note else ""
        lines.append(
            f"| {ref.metric} | {source}{note} | {a.run} | {shown} | {ref.value:g} | {ours:.4f} "
            f"| {ours - ref.value:+.4f} | {verdict} |"
        )
    return "\n".join(lines)


def classifier_table(study: StudyConfig, metrics_dir: Path) -> str:
    """Markdown: each classifier of a labelled corpus (``baselines``) with its accuracy per split, test F1 and
    test confusion matrix, beside the book's published accuracies on its own split and model."""
    if not study.baselines:
        return ""
    lines = ["| classifier | corpus | train acc. | val acc. | test acc. | test F1 | test confusion (rows: true) |",
             "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, cfg in study.baselines.items():
        s = read_metrics(metrics_dir, metrics_stem(name))["splits"]
        labels = study.corpora[cfg.corpus].labels or []
        confusion = "; ".join(f"{x}: {' / '.join(map(str, row))}" for x, row in zip(labels, s["test"]["confusion"]))
        accs = " | ".join(f"{100 * s[k]['accuracy']:.2f} %" for k in ("train", "val", "test"))
        f1 = s["test"].get("f1", s["test"]["macro_f1"])
        lines.append(f"| {name}: TF-IDF {cfg.analyzer} {cfg.ngram_min}–{cfg.ngram_max}-grams + logistic regression "
                     f"| {cfg.corpus} | {accs} | {f1:.4f} | {confusion} (of {' / '.join(labels)}) |")  # fmt: skip
    book = [published(f"raschka-spam-{k}-accuracy") for k in ("train", "val", "test")]
    lines.append(f"| published: {book[0].source}, GPT-2 124M fine-tuned, its own split | SMS | "
                 + " | ".join(f"{100 * b.value:.2f} %" for b in book) + " | | |")  # fmt: skip
    return "\n".join(lines)


def per_token_table(study: StudyConfig, table: pd.DataFrame) -> str:
    """Markdown: per `report.per_token` reference, every run of its corpus in tokens, per-token ppl and bpc, and
    the characters per token the reference's tokenizer would need for its ppl to equal that run's bpc."""
    out = []
    for ref in study.report.per_token:
        published = ref.reference
        bits = math.log2(published.value)
        rows = table[table["corpus"] == ref.corpus]
        lines = [
            f"**{ref.corpus}**: {published.source}: perplexity {published.value:g} per token = {bits:.3f} bits per "
            f"token ({published.measures}). It equals a run's bpc only if its tokens average (bits per token ÷ bpc) "
            "characters: the last column. Per-token ppl compares only within one tokenizer.",
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


def heads_table(study: StudyConfig, metrics_dir: Path) -> str:
    """Markdown: per attention run, its clearest previous-token and induction heads (from the numbers), then every
    head's two scores, layer by layer."""
    from lm.inspection import clearest_heads

    out = []
    for name in study.runs:
        heads = read_metrics(metrics_dir, name).get("heads")
        if not heads:
            continue
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


def quality_table(study: StudyConfig, metrics_dir: Path) -> str:
    """Markdown: per text run, BLEU and chrF of its greedy and sampled continuations of the fixed val prompts, and
    distinct-1/2 and the 8-gram copy rate of the sampled ones, beside the true continuations' own numbers."""
    rows, ref = [], {}
    for name in study.runs:
        q = read_metrics(metrics_dir, name).get("quality")
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
