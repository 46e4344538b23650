"""The study's report: reports/README.md, reports/runs.csv and reports/figures/*.png, which read offline on a
repository page (no JavaScript, no internet), and reports/machine.json, the record of the machine that made them.

It reads files only (metrics JSON, curves, samples, the arrays evaluate wrote, the training-health records) and
computes no model: ``tables`` builds the tables, ``figures`` and ``inside`` draw, ``markdown`` writes the text.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd

from lm.atomic import OutputError, atomic_write_text, publish, write_json
from lm.config import StudyConfig
from lm.machine import describe
from lm.report import figures, inside, markdown, tables

OUTPUTS = ("figures", "README.md", "runs.csv", "machine.json")
"""What the report stage writes into its folder (the rest of reports/ is not its own)."""


def write_report(
    study: StudyConfig,
    metrics_dir: Path,
    curves_dir: Path,
    inside_dir: Path,
    models_dir: Path,
    samples_dir: Path,
    out_dir: Path,
) -> pd.DataFrame:
    """Write out_dir/README.md, out_dir/runs.csv, out_dir/figures/*.png and out_dir/machine.json (this machine's
    record); return the run table.

    The report is made whole in a temporary folder inside `out_dir`, then each output replaces its previous
    version: a failure (a full disk) leaves the previous report as it was, never half new, and raises OutputError
    naming `out_dir`. `models_dir` is read for the training-health records only (models/<run>/health.json)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".report.", suffix=".tmp", dir=out_dir))
    except OSError as e:
        raise OutputError(out_dir, e) from e
    try:
        table = _write(study, metrics_dir, curves_dir, inside_dir, models_dir, samples_dir, staging)
        for name in OUTPUTS:
            publish(staging / name, out_dir / name)
    except OSError as e:
        raise OutputError(out_dir, e) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return table


def _write(study: StudyConfig, metrics_dir: Path, curves_dir: Path, inside_dir: Path, models_dir: Path,
           samples_dir: Path, out_dir: Path) -> pd.DataFrame:  # fmt: skip
    fig_dir = out_dir / "figures"
    fig_dir.mkdir()
    table = tables.run_table(study, metrics_dir)
    figures.plot_loss_curves(study, curves_dir, table, fig_dir / "loss_curves.png")
    figures.plot_bpc_vs_params(study, table, fig_dir / "bpc_vs_params.png")
    shares = dict(zip(table["run"], table["params_by_component"])) | figures.reference_shares()
    figures.plot_param_shares(shares, fig_dir / "param_shares.png")
    drawn = {"loss_curves": [], "bpc_vs_params": [], "param_shares": []}
    drawn |= inside.draw_inside(study, metrics_dir, inside_dir, models_dir, fig_dir)
    columns = ["params_by_component", "val tokens per character"]
    table.drop(columns=columns).to_csv(out_dir / "runs.csv", index=False, float_format="%.6g")
    text = markdown.report_markdown(markdown.Inputs(study, table, metrics_dir, samples_dir, drawn))
    atomic_write_text(out_dir / "README.md", text)
    # Which machine made these numbers: `lm verify` expects the same bits on the same class (lm/machine.py).
    write_json(out_dir / "machine.json", describe())
    return table
