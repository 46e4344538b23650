"""The GGUF report (reports/gguf/): what llama.cpp says about our gpt and llama runs, from the gguf stages' files.

README.md: the checks (tokenization of the whole val text, logits, greedy generation, llama-perplexity against our
scorer under its protocol) and the quantization table (file size, whole-val bits per character through llama.cpp
and the difference to our float32 number, llama-perplexity). figures/quantization.png: each run's bpc increase
against its file size, one point per type. The generation speeds (llama.cpp beside ours) are measured, so they go
to their own page outside git (gguf/speed.md, a DVC-cached output).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lm.atomic import atomic_dir, atomic_write_text  # noqa: E402
from lm.config import StudyConfig  # noqa: E402
from lm.report.figures import COLORS, save_figure  # noqa: E402
from lm.report.tables import read_metrics  # noqa: E402


def check_lines(rows: dict[str, dict]) -> list[str]:
    """One row per run: the f32 export's agreement with our implementation."""
    lines = ["| run | llama.cpp graph | val tokens: llama-tokenize = ours | logits max abs. diff (first val window) "
             "| the same, llama.cpp's GELU in ours | greedy tokens equal (KV cache, refill) | llama-completion = ours "
             "(one window) | llama-perplexity | ours, same protocol | the same, llama.cpp's GELU in ours |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|"]  # fmt: skip
    for name, m in rows.items():
        c, p = m["checks"], m["checks"]["perplexity"]
        tok = "yes" if c["tokenization_equal"] else f"no, from token {c['tokenization_first_difference']:,}"
        lines.append(
            f"| {name} | {m['architecture']} | {tok} ({c['val_tokens']:,}) | {c['logits_max_abs_diff']:.1e} | "
            f"{'' if (g := c.get('logits_max_abs_diff_ggml_gelu')) is None else f'{g:.1e}'} | "
            f"{'yes' if c['greedy_equal'] else 'no'} ({c['greedy_tokens']}) | "
            f"{'yes' if c['completion_equal'] else 'no'} | {p['llama_cpp']:.4f} ± {p['llama_cpp_sd']:.4f} | "
            f"{p['ours']:.4f} | {'' if (q := p.get('ours_ggml_gelu')) is None else f'{q:.4f}'} |"
        )
    return lines


def quantization_lines(rows: dict[str, dict]) -> list[str]:
    """One row per run and type: size, whole-val bpc through llama.cpp, its difference to ours."""
    lines = ["| run | type | file (MiB) | val bpc, llama.cpp | Δ vs ours (fp32) | llama-perplexity |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in rows.items():
        for qtype, t in m["types"].items():
            fallback = f" ({len(t['f16_fallback'])} matrices f16)" if t["f16_fallback"] else ""
            lines.append(
                f"| {name} | {qtype}{fallback} | {t['size_bytes'] / 2**20:.2f} | {t['bpc']:.4f} | "
                f"{t['delta_bpc']:+.4f} | {t['perplexity']:.4f} |"
            )
    return lines


def speed_lines(speeds: dict[str, dict]) -> list[str]:
    """Generation tokens/s: llama.cpp per type beside ours."""
    types = list(dict.fromkeys(t for s in speeds.values() for t in s["llama_cpp_tokens_per_s"]))
    head = " | ".join(f"llama.cpp {t}" for t in types)
    lines = [f"| run | tokens | {head} | ours (lm sample, fp32, KV cache) |", "|---|---:|" + "---:|" * (len(types) + 1)]
    for name, s in speeds.items():
        theirs = [f"{s['llama_cpp_tokens_per_s'][t]:,.0f}" if t in s["llama_cpp_tokens_per_s"] else "" for t in types]
        lines.append(f"| {name} | {s['tokens']} | " + " | ".join(theirs) + f" | {s['ours_tokens_per_s']:,.0f} |")
    return lines


def plot_quantization(rows: dict[str, dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, m), color in zip(rows.items(), COLORS, strict=False):
        types = list(m["types"])
        sizes = [m["types"][t]["size_bytes"] / 2**20 for t in types]
        deltas = [m["types"][t]["delta_bpc"] for t in types]
        ax.plot(sizes, deltas, "o-", color=color, label=name)
        for t, x, y in zip(types, sizes, deltas, strict=True):
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("GGUF file size (MiB, log scale)")
    ax.set_ylabel("val bpc through llama.cpp − ours (fp32)")
    ax.set_title("What quantization costs")
    ax.legend(fontsize=8)
    save_figure(fig, out)


INTRO = [
    "# The ladder's models in llama.cpp",
    "",
    "Each run below is exported with `lm export RUN --format gguf --type T` (lm/gguf_export.py) and run by llama.cpp "
    "itself, built from the llama-cpp-python sdist (lm/llamacpp.py; docs/gguf.md says how to run the files "
    "yourself). llama.cpp implements the same mathematics in code nobody here wrote: where it agrees with ours, both "
    "are right or both are wrong in the same way.",
    "",
]
CHECKS = [
    "## Checks (the f32 export)",
    "",
    "Tokenization: llama-tokenize on the whole val text. Logits: the first val window of block_size tokens. Greedy: "
    "tokens after the val text's first characters, llama.cpp's KV cache refilled from the last half of the window "
    "past block_size, as `lm sample --top-k 1 --overflow refill`; llama-completion: its own greedy text inside one "
    "window. llama-perplexity: non-overlapping windows of block_size tokens, the second half of each scored, f32 KV "
    "cache; ours: the same windows and targets through our scorer (lm.batches.Batches.chunks). llama-perplexity "
    "prints 4 decimals.",
    "",
]
COSTS = [
    "## What quantization costs",
    "",
    "val bpc: llama.cpp's logits on exactly the windows our evaluate stage scores (every val token), against our "
    "float32 number on the same windows. 1-D tensors stay f32 in every type; rows that are not whole blocks of 32 "
    "fall back to f16. Generation speed is measured, not computed, so like every wall-clock number it stays out of "
    "git: `make gguf` writes it to gguf/speed.md (DVC's cache); docs/gguf.md has the numbers of its last run.",
    "",
]


def write_gguf_report(study: StudyConfig, metrics_dir: Path, speed_dir: Path, out: Path, speed_out: Path) -> dict:
    """Write reports/gguf (README.md, figures/: computed numbers only, the same on every run) and ``speed_out`` (the
    measured generation speeds), each atomically; returns the gguf stages' metrics by run."""
    rows = {name: read_metrics(metrics_dir, name) for name in study.gguf}
    speeds = {name: read_metrics(speed_dir, name) for name in study.gguf}
    md = list(INTRO)
    if rows:
        md += CHECKS + check_lines(rows) + [""] + COSTS + quantization_lines(rows)
        md += ["", "![quantization](figures/quantization.png)", ""]
    speed_md = ["# Generation speed: llama.cpp beside lm sample", ""]
    if speeds:
        s = next(iter(speeds.values()))
        speed_md += [
            f"Tokens per second generating one window after the val text's first characters, {s['threads']} "
            f"threads, the median of {s['repeats']} runs each: llama-completion's eval timer (llama.cpp of "
            f"llama-cpp-python {next(iter(rows.values()))['llama_cpp']['version']}, flash attention off) and our "
            "KV-cache generation counted the same way (the tokens after the first, the prompt excluded). Measured "
            "on the machine that ran `make gguf`, so they vary between runs and machines.",
            "",
            *speed_lines(speeds),
            "",
        ]
    with atomic_dir(out) as tmp:
        (tmp / "README.md").write_text("\n".join(md))
        if rows:
            plot_quantization(rows, tmp / "figures" / "quantization.png")
    atomic_write_text(speed_out, "\n".join(speed_md))
    return rows
