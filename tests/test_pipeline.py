"""End to end: the real `dvc repro` of the whole pipeline on presets/tiny.yaml, in a temporary copy
of the repository (a git repo of its own, as a user's clone), reading the corpora from the mirror."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from lm.references import published

from helpers import copy_project, sh
from tiny import tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root: Path, mirror: Path) -> Path:
    """A fresh copy of the tracked files with the tiny preset as params.yaml, after one `dvc repro`."""
    dst = copy_project(repo_root, tmp_path_factory.mktemp("project"))
    os.environ["LM_DATA_MIRROR"] = str(mirror)
    sh(dst, "dvc", "repro")
    return dst


def test_every_output_exists_and_every_metric_is_finite(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for corpus in params["corpora"]:
        assert (project / "data" / corpus / "dataset" / "dataset_dict.json").is_file()
    for tok in params["tokenizers"]:
        assert {"tokenizer.json", "train.bin", "val.bin", "stats.json"} <= {
            p.name for p in (project / "tokenizers" / tok).iterdir()
        }
    for run in params["runs"]:
        assert (project / "models" / run / "model.safetensors").is_file()
        assert (project / "curves" / f"{run}.csv").is_file()
        m = json.loads((project / "metrics" / f"{run}.json").read_text())
        for key in ["val/loss", "val/ppl", "val/bpc", "params"]:
            assert math.isfinite(m[key]), (run, key, m[key])
        assert (project / "samples" / f"{run}.txt").read_text().strip()
    report = (project / "reports" / "README.md").read_text()
    for run in params["runs"]:
        assert f"| {run} " in report
    # makemore's count-bigram NLL, fitted and scored on every split (the fixture names: 14,035 bigrams), in the
    # report's source anchors beside the published value (tests/test_references.py checks the full corpus's).
    counted = json.loads((project / "metrics" / "names-bigram_counts.json").read_text())
    ref = published("makemore-bigram-nll")
    assert counted["all/tokens"] == 14_035 and math.isfinite(counted["all/loss"])
    assert f"| names-bigram_counts | counted | {ref.value:g} | {counted['all/loss']:.4f} |" in report
    # Every gradient run names the step its checkpoint holds.
    assert "checkpoint step" in report
    # Inside the models: head scores of every attention run with its grid, quality scores of every text run, the
    # health records of the runs that ask for them, the names embeddings in 2-D.
    for run, cfg in params["runs"].items():
        m = json.loads((project / "metrics" / f"{run}.json").read_text())
        attention = cfg["model"]["family"] in {"single_head", "multi_head", "block", "gpt", "llama"}
        assert bool(m.get("heads")) == attention, run
        if attention:
            assert (project / "reports" / "figures" / f"attention-{run}.png").stat().st_size > 1000
            assert all(0 <= v <= 1 for h in m["heads"].values() for v in h.values())
        text = params["corpora"][params["tokenizers"][cfg["tokenizer"]]["corpus"]]["format"] == "text"
        assert ("quality" in m) == text, run
        health = project / "models" / run / "health.json"
        assert health.exists() == ("health_every" in cfg.get("train", {})), run
    assert "its clearest previous-token head is" in report and "## Generation quality beyond perplexity" in report
    for name, b in params["baselines"].items():  # the labelled corpus's classifier, scored and in the report
        m = json.loads((project / "metrics" / f"baseline-{name}.json").read_text())
        n = sum(map(sum, m["splits"]["test"]["confusion"]))
        assert n == m["splits"]["test"]["examples"] > 0 and 0.5 < m["splits"]["test"]["accuracy"] <= 1
        assert f"| {name}: TF-IDF {b['analyzer']}" in report and "## Classifying SMS spam" in report
    assert "figures/health-names-mlp.png" in report and "figures/embedding_pca.png" in report
    for fig in ["loss_curves", "bpc_vs_params", "param_shares", "bigram_heatmaps", "embedding_similarity"]:
        assert (project / "reports" / "figures" / f"{fig}.png").stat().st_size > 1000
        assert f"figures/{fig}.png" in report


def test_fine_tuning_writes_its_table_confusion_matrices_and_probe_figure(project: Path):
    """The finetune, probe and finetune-report stages of the tiny preset ran in the same `dvc repro`."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    report = (project / "reports" / "finetune" / "README.md").read_text()
    for name, ft in params["finetune"].items():
        m = json.loads((project / "finetune" / "metrics" / f"{name}.json").read_text())
        assert (project / "finetune" / "models" / name / "model.safetensors").is_file()
        assert 0 <= m["splits"]["test"]["accuracy"] <= 1 and len(m["seeds"]["seeds"]) == 1 + len(
            ft.get("spread_seeds", [])
        )
        assert f"| {name} | " in report
    for name in params["probes"]:
        assert json.loads((project / "finetune" / "probes" / f"{name}.json").read_text())["models"]["random"]
    assert "| sms-tfidf | none: TF-IDF" in report and "Raschka" in report
    for fig in ("confusion", "probes"):
        assert (project / "reports" / "finetune" / "figures" / f"{fig}.png").stat().st_size > 1000


def test_gguf_stage_checks_its_exports_with_llama_cpp(project: Path):
    """The tiny preset's gguf stage exported its run in each type and llama.cpp agreed with us on it; the report
    has the checks and the quantization table, gguf/speed.md the measured speeds."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    report = (project / "reports" / "gguf" / "README.md").read_text()
    for run, cfg in params["gguf"].items():
        m = json.loads((project / "gguf" / "metrics" / f"{run}.json").read_text())
        speed = json.loads((project / "gguf" / "speed" / f"{run}.json").read_text())
        c = m["checks"]
        assert c["tokenization_equal"] and c["greedy_equal"] and c["completion_equal"], c
        assert c["logits_max_abs_diff"] < 1e-3 and abs(c["perplexity"]["llama_cpp"] - c["perplexity"]["ours"]) < 6e-5
        assert list(m["types"]) == cfg["types"] and set(speed["llama_cpp_tokens_per_s"]) == set(cfg["types"])
        for qtype in cfg["types"]:
            assert (project / "gguf" / "models" / run / f"{run}-{qtype}.gguf").read_bytes()[:4] == b"GGUF"
            assert f"| {run} | {qtype}" in report
        assert m["types"]["q8_0"]["f16_fallback"]  # n_embd 16: no whole block of 32, so f16
        assert f"| {run} | {m['architecture']} | yes ({c['val_tokens']:,})" in report
    assert "| llama.cpp f32 |" in (project / "gguf" / "speed.md").read_text()
    assert (project / "reports" / "gguf" / "figures" / "quantization.png").stat().st_size > 1000


MEASURED = ("gguf/speed",)
"""Outputs that hold measured generation speeds: they differ between any two runs, by design."""


def test_a_second_clean_repro_is_bit_identical(project: Path, repo_root: Path, tmp_path: Path):
    """Another fresh copy, another `dvc repro` (tracking off there: logging must not change results):
    every output byte-identical (metrics, checkpoints, samples, curves, the report and its figures), so
    dvc.lock records the same md5s (the measured generation speeds of MEASURED aside). This is what `make verify`
    checks on the real ladder."""
    params = tiny_params()
    params["tracking"] = {"enabled": False}
    other = copy_project(repo_root, tmp_path, yaml.safe_dump(params, sort_keys=False))
    sh(other, "dvc", "repro")
    compared = 0
    patterns = ("metrics/*.json", "models/*/*", "samples/*.txt", "tokenizers/*/*", "curves/*.csv", "reports/**/*.*",
                "gguf/metrics/*.json", "gguf/models/*/*")  # fmt: skip

    def computed(root: Path, pattern: str) -> list[Path]:
        found = (p.relative_to(root) for p in root.glob(pattern))
        return sorted(p for p in found if not str(p).startswith(MEASURED))

    for pattern in patterns:
        mine = computed(project, pattern)
        assert mine == computed(other, pattern), pattern
        for rel in mine:
            assert (project / rel).read_bytes() == (other / rel).read_bytes(), rel
            compared += 1
    assert compared > 60

    def outs(root: Path) -> dict[str, str]:
        stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"].values()
        return {o["path"]: o["md5"] for s in stages for o in s.get("outs", []) if not o["path"].startswith(MEASURED)}

    assert outs(project) == outs(other)


def test_report_numbers_are_the_metrics(project: Path):
    import pandas as pd

    table = pd.read_csv(project / "reports" / "runs.csv")
    for _, row in table.iterrows():
        m = json.loads((project / "metrics" / f"{row['run']}.json").read_text())
        assert row["val loss"] == pytest.approx(m["val/loss"], rel=1e-5)
        assert row["params"] == m["params"]


def test_second_repro_is_a_no_op(project: Path):
    out = sh(project, "dvc", "repro").stdout
    assert "Data and pipelines are up to date" in out
    assert "Running stage" not in out


def test_results_travel_with_dvc_push_and_pull(project: Path):
    """A colleague gets every model and tokenizer without training: `dvc push --run-cache` to the project's default
    remote (a folder beside the project, .dvc/config), a clone, `dvc pull --run-cache`; then nothing is stale."""
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    remote = project.parent / "lm-ladder-dvc-storage"
    listed = sh(project, "dvc", "remote", "list").stdout
    assert re.search(rf"^storage\s+{re.escape(str(remote))}\s+\(default\)", listed, re.M), listed
    sh(project, "dvc", "push", "--run-cache")
    assert any(p.is_file() for p in remote.rglob("*"))
    clone = project.parent / "colleague"
    sh(project.parent, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "models").exists()
    sh(clone, "dvc", "pull", "--run-cache")
    for run in yaml.safe_load((clone / "params.yaml").read_text())["runs"]:
        assert (clone / "models" / run / "model.safetensors").read_bytes() == (
            project / "models" / run / "model.safetensors"
        ).read_bytes()
    assert "Data and pipelines are up to date" in sh(clone, "dvc", "status").stdout
    out = sh(clone, "dvc", "repro").stdout
    assert "Data and pipelines are up to date" in out and "Running stage" not in out
    assert sh(clone, "git", "status", "--porcelain").stdout == ""


def test_changing_one_runs_lr_reruns_only_that_run_and_the_reports(project: Path):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["runs"]["names-mlp"]["train"]["lr"] = 0.02
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        out = sh(project, "dvc", "repro").stdout
        ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
        # The check stage re-runs on any params.yaml edit; its params.ok is unchanged, so it re-runs nothing. The
        # fine-tuning report reads the baselines' metrics from metrics/, so it re-renders too (seconds, same bytes).
        assert ran == ["check", "evaluate@names-mlp", "finetune-report", "report", "train@names-mlp"], out
    finally:
        params_path.write_text(original)


def test_broken_params_fail_before_any_work(project: Path):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    try:
        params_path.write_text(original.replace("format: lines", "format: verse"))
        r = sh(project, sys.executable, "-m", "stages.fetch", "names", "--out", "data/names", check=False)
        assert r.returncode == 2
        assert "corpora.names.format: got 'verse'" in r.stderr
    finally:
        params_path.write_text(original)


def test_a_full_disk_while_writing_the_report_leaves_the_previous_report_whole(project, tmp_path, monkeypatch, capsys):
    """The disk fills at the third figure: a 40-line PIL traceback used to end the stage with three new figures
    beside the old README.md and runs.csv. The report is made whole aside, so the previous one is untouched, no
    temporary folder is left, and the stage says `cannot write reports` in one line."""
    import errno

    import matplotlib.figure

    import stages.report

    reports = project / "reports"
    before = {p.relative_to(reports): p.read_bytes() for p in sorted(reports.rglob("*")) if p.is_file()}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # the runs' order is the report's
    real, drawn = matplotlib.figure.Figure.savefig, []

    def savefig(self, *a, **k):
        drawn.append(a[0])
        if len(drawn) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    monkeypatch.chdir(project)
    args = ["--metrics", "metrics", "--curves", "curves", "--inside", "inside", "--models", "models", "--samples",
            "samples", "--out", "reports", "--params", str(tmp_path / "p.yaml")]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        stages.report.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: report: cannot write reports: No space left on device; free disk space and rerun")
    after = {p.relative_to(reports): p.read_bytes() for p in sorted(reports.rglob("*")) if p.is_file()}
    assert after == before and not list(reports.glob(".report.*"))
    monkeypatch.undo()
    monkeypatch.chdir(project)
    stages.report.main(args)  # space freed: the same report again, byte for byte
    assert {p.relative_to(reports): p.read_bytes() for p in sorted(reports.rglob("*")) if p.is_file()} == before


def test_bad_params_stop_dvc_repro_before_it_removes_any_output(project):
    """Plain `dvc repro` with a run naming a missing tokenizer: DVC removed the trained model and the committed
    curve before the stage found the problem. The check stage, upstream of every stage, stops it first."""
    params = project / "params.yaml"
    good = params.read_text()
    run = "names-bigram_nn"
    model, curve = project / "models" / run, project / "curves" / f"{run}.csv"
    before = {p.name: p.read_bytes() for p in model.iterdir()} | {curve.name: curve.read_bytes()}
    bad = yaml.safe_load(good)
    bad["runs"][run]["tokenizer"] = "names-chr"
    try:
        params.write_text(yaml.safe_dump(bad, sort_keys=False))
        r = sh(project, "dvc", "repro", f"train@{run}", check=False)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "Running stage 'check'" in out and f"train@{run}'" not in out, out
        assert f"runs.{run}.tokenizer: got 'names-chr'" in out, out
    finally:
        params.write_text(good)
    assert {p.name: p.read_bytes() for p in model.iterdir()} | {curve.name: curve.read_bytes()} == before


def test_a_stage_stopped_by_its_params_check_says_what_dvc_removed(tmp_path, monkeypatch, capsys):
    """Run alone (`dvc repro --single-item`), a stage that stops on a bad params file says that DVC removed its
    outputs first, and how to have them back."""
    import stages.train

    params = tiny_params()
    params["runs"]["names-bigram_nn"].setdefault("train", {})["lr"] = -1
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("DVC_STAGE", "train@names-bigram_nn")
    with pytest.raises(SystemExit) as e:
        stages.train.main(["names-bigram_nn", "--tokenizer", "t", "--out", "m", "--curve", "c", "--params",
                           str(tmp_path / "p.yaml")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and "note: DVC removed the outputs of train@names-bigram_nn before running it" in err
    assert "`dvc checkout train@names-bigram_nn`" in err and "`git checkout -- PATH`" in err


def test_a_stage_exits_without_a_last_garbage_collection(tmp_path, repo_root):
    """Every stage freezes the garbage collector at exit (stages.common.study), so Python's exit skips its last
    collections over torch's, MLflow's and SQLAlchemy's objects; a handler registered before the stage's runs
    after that one and sees the frozen objects."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from stages.common import study\n"
        f"study({str(tmp_path / 'p.yaml')!r})\n"
        "print('frozen before exit:', gc.get_freeze_count() > 0)\n"
    )
    out = sh(repo_root, sys.executable, "-c", code).stdout
    assert "frozen before exit: False" in out and "frozen at exit: True" in out
