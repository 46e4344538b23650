"""The fine-tuning report (reports/finetune/): what pretraining buys a classifier, from the finetune, probe and
baseline stages' files.

README.md: one table on the test split (each fine-tune's accuracy and F1 at train.seed, its seeds' mean, sd and
range, the difference to the random-init row of the same run with a mark where it is beyond twice its standard
error, the baselines, the book's published numbers cited as its own), the unknown-character counts, the probes.
figures/confusion.png: every fine-tune's test confusion matrix; figures/probes.png: probe test accuracy by layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lm.atomic import atomic_dir  # noqa: E402
from lm.classification import metrics_stem  # noqa: E402
from lm.config import StudyConfig  # noqa: E402
from lm.references import published  # noqa: E402
from lm.report.figures import COLORS, save_figure  # noqa: E402
from lm.report.tables import read_metrics  # noqa: E402

TRAINABLE = {"head": "head only", "last_block": "last block + final norm + head", "all": "everything"}


def beyond(a: dict, b: dict) -> bool:
    """Whether two rows' seed means differ by more than twice the standard error of the difference."""
    se = math.sqrt(a["sd"] ** 2 / len(a["seeds"]) + b["sd"] ** 2 / len(b["seeds"]))
    return abs(a["mean"] - b["mean"]) > 2 * se


def finetune_table(study: StudyConfig, rows: dict[str, dict], baselines: dict[str, dict]) -> list[str]:
    """The test-split table: fine-tunes in params order, then the baselines and the book's numbers."""
    random_of = {m["run"]: m["seeds"] for m in rows.values() if m["init"] == "random"}
    lines = ["| fine-tune | pretrained run | trained | params trained | test acc. | test F1 | seeds: mean ± sd "
             "(min–max) | Δ mean vs random init |", "|---|---|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for name, m in rows.items():
        t, s = m["splits"]["test"], m["seeds"]
        init = "random init" if m["init"] == "random" else m["run"]
        delta = ""
        if m["init"] == "pretrained" and (r := random_of.get(m["run"])):
            delta = f"{100 * (s['mean'] - r['mean']):+.2f}" + (" *" if beyond(s, r) else "")
        lines.append(
            f"| {name} | {init} ({study.runs[m['run']].tokenizer}) | {TRAINABLE[m['trainable']]} | "
            f"{m['trained_params']:,} | {100 * t['accuracy']:.2f} % | {t.get('f1', t['macro_f1']):.4f} | "
            f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f} ({100 * s['min']:.2f}–{100 * s['max']:.2f}), "
            f"{len(s['seeds'])} seeds | {delta} |"
        )
    for name, b in baselines.items():
        t = b["splits"]["test"]
        lines.append(f"| {name} | none: TF-IDF + logistic regression | | {b['features']:,} features | "
                     f"{100 * t['accuracy']:.2f} % | {t.get('f1', t['macro_f1']):.4f} | deterministic | |")  # fmt: skip
    train, val, test = (published(f"raschka-spam-{k}-accuracy") for k in ("train", "val", "test"))
    lines.append(f"| published: {test.source} | GPT-2 124M (its own split) | last block + final norm + head | | "
                 f"{100 * test.value:.2f} % | | its train {100 * train.value:.2f} %, val {100 * val.value:.2f} % "
                 "| |")  # fmt: skip
    return lines


def unknown_lines(rows: dict[str, dict]) -> list[str]:
    """Per tokenizer: test messages holding characters its vocabulary lacks, and the commonest ones."""
    seen, out = set(), []
    for m in rows.values():
        tok = m["tokens"]["test"]
        key = (m["run"], m["max_length"])
        if key in seen:
            continue
        seen.add(key)
        common = ", ".join(f"{c!r} {n}" for c, n in list(tok["unknown_chars"].items())[:8])
        out.append(f"- {m['run']}: {tok['with_unknown']} of {tok['messages']} test messages hold characters its "
                   f"vocabulary lacks{f' ({common}, ...)' if common else ''}; {tok['truncated']} are longer than "
                   f"{m['max_length']} tokens ({m['truncation_side']} side cut).")  # fmt: skip
    return out


def plot_confusions(rows: dict[str, dict], labels: list[str], out: Path) -> None:
    """One small test confusion matrix per fine-tune (rows: true label, columns: predicted)."""
    n = len(rows)
    cols = min(4, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3 * cols, 3.3 * rows_n), squeeze=False, layout="constrained")
    for ax, (name, m) in zip(axes.flat, rows.items(), strict=False):
        cm = m["splits"]["test"]["confusion"]
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(map(max, cm)))
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", color="black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(f"{name}\n{100 * m['splits']['test']['accuracy']:.2f} %", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("predicted")
    fig.supylabel("true")
    save_figure(fig, out)


def plot_probes(probes: dict[str, dict], out: Path) -> None:
    """Probe test accuracy by layer (0: embeddings): solid pretrained, dashed random init, one colour per probe."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for color, p in zip(COLORS, probes.values(), strict=False):
        for init, style in (("pretrained", "-"), ("random", "--")):
            ax.plot(p["layers"], [100 * r["test"] for r in p["models"][init]], style, color=color, marker="o",
                    label=f"{p['run']} ({init})")  # fmt: skip
    ax.set_xticks(next(iter(probes.values()))["layers"])
    ax.set_xlabel("layer (0: token + position embeddings; i: after block i)")
    ax.set_ylabel("test accuracy of a linear probe (%)")
    ax.set_title("Where the features live: a logistic regression on each layer's last-token state")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out)


def probe_lines(probes: dict[str, dict]) -> list[str]:
    lines = ["| probe | model | " + " | ".join(f"layer {i}" for i in next(iter(probes.values()))["layers"]) + " |"]
    lines.append("|---|---|" + "---:|" * len(next(iter(probes.values()))["layers"]))
    for name, p in probes.items():
        for init, layers in p["models"].items():
            lines.append(f"| {name} | {p['run']} ({init}) | " + " | ".join(f"{100 * r['test']:.2f}" for r in layers)
                         + " |")  # fmt: skip
    return lines


def write_finetune_report(
    study: StudyConfig, finetune_dir: Path, probes_dir: Path, metrics_dir: Path, out: Path
) -> dict[str, dict]:
    """Write reports/finetune (README.md, figures/) atomically; returns the fine-tunes' metrics by name."""
    rows = {name: read_metrics(finetune_dir, name) for name in study.finetune}
    probes = {name: read_metrics(probes_dir, name) for name in study.probes}
    baselines = {name: read_metrics(metrics_dir, metrics_stem(name)) for name in study.baselines}
    labels = next(iter(rows.values()))["splits"]["test"]["per_label"] if rows else {}
    md = ["# Fine-tuning the ladder's models to classify", "",
          "Each fine-tune puts a linear head on the last kept token's final hidden state of a trained run and trains "
          "the part named below with AdamW, keeping the step with the best val accuracy (lm/finetune.py). The test "
          "split is 300 messages: one message is 0.33 points, so each row gives its spread over seeds (the head's "
          "init and the batch order; the split is the study's). Δ compares a row's seed mean with the random-init "
          "row of the same run; * marks a difference beyond twice its standard error. The book's number is its own, "
          "on its own split and model, not ours.", ""]  # fmt: skip
    if rows:
        md += finetune_table(study, rows, baselines) + ["", "Characters and lengths:", ""] + unknown_lines(rows)
        md += ["", "![confusion matrices](figures/confusion.png)", ""]
    if probes:
        md += ["## Linear probes per layer", "",
               "A logistic regression on the frozen last-token state after each layer (lm/probe.py), C picked on val; "
               "test accuracy in %. Dashed in the figure: the same architecture at random init.", ""]  # fmt: skip
        md += probe_lines(probes) + ["", "![probes](figures/probes.png)", ""]
    with atomic_dir(out) as tmp:
        (tmp / "README.md").write_text("\n".join(md))
        if rows:
            plot_confusions(rows, list(labels), tmp / "figures" / "confusion.png")
        if probes:
            plot_probes(probes, tmp / "figures" / "probes.png")
    return rows
