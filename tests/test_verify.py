"""`lm verify` (lm/verify.py) on a small git repository of committed outputs, changed in the working tree as
another machine would change them: within tolerance passes, beyond it fails naming the run and the number, a
flipped conclusion fails, the same machine class demands bit-identity, missing and extra runs are named; the
machine record round-trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm.config import load_params
from lm.machine import describe, differences, same_class
from lm.verify import BF16_SEED_SD, COUNTED, FP32, report, verify

from tiny import tiny_params

RUNS = {
    "names-bigram_counts": {"tokenizer": "names-char", "model": {"family": "bigram_counts"}, "train": {"max_steps": 0}},
    "names-mlp": {"tokenizer": "names-char", "model": {"family": "mlp", "block_size": 3, "n_embd": 8, "n_hidden": 16},
                  "train": {"max_steps": 10}},
    "names-gpt": {"tokenizer": "names-char", "model": {"family": "gpt", "block_size": 8, "n_layer": 1, "n_head": 2,
                  "n_embd": 16}, "train": {"max_steps": 10, "dtype": "auto"}},
}  # fmt: skip
LOSSES = {"names-bigram_counts": 2.45, "names-mlp": 2.30, "names-gpt": 2.10}
SEED_SD = 0.01
MACHINE = {"cpu": "Some CPU", "flags": ["avx2", "avx512_bf16"], "threads": 2, "torch": "2.13.0+cpu", "onednn": "3.1",
           "mkl": "2024", "machine": "x86_64", "cpu_capability": "AVX512", "onednn_max_isa": ""}  # fmt: skip


def metrics(run: str, loss: float, dtype: str) -> dict:
    m = {"run": run, "vocab_size": 27, "val/loss": loss, "val/ppl": 2.718281828**loss, "val/bpc": loss * 1.4427,
         "val/tokens": 1000, "val/characters": 1000, "train/loss": loss - 0.1, "train/steps": 10, "train/tokens": 640,
         "params": 100}  # fmt: skip
    if run == "names-bigram_counts":
        m |= {"all/loss": 2.4545, "train/steps": 0}
    else:
        m["train/dtype"] = dtype
    return m


def write(root: Path, losses: dict[str, float], machine: dict, dtype: str = "bfloat16", curve_shift: float = 0.0):
    for run, loss in losses.items():
        (root / "metrics" / f"{run}.json").write_text(json.dumps(metrics(run, loss, dtype if run == "names-gpt" else
                                                                          "float32"), indent=2))  # fmt: skip
        rows = ["step,tokens,train_loss,val_loss,lr"] + [
            f"{s},{s * 64},{loss + 1 / s + curve_shift},{loss + 2 / s + curve_shift},0.001" for s in (1, 5, 10)
        ]
        (root / "curves" / f"{run}.csv").write_text("\n".join(rows) + "\n")
    (root / "reports" / "machine.json").write_text(json.dumps(machine))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed study of three runs, with a seed table for the bf16 run."""
    for d in ("metrics", "curves", "reports/seeds"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(RUNS, tokenizers=["names-char"])))
    write(tmp_path, LOSSES, MACHINE)
    (tmp_path / "reports" / "seeds" / "names.md").write_text(
        "### bench.seeds\n\nWhole-split val loss (nats/token) by `train.seed`, 2 seeds.\n\n"
        "| run | seed 1 | seed 2 | mean | sd | min | max | committed |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| names-gpt | 2.10 | 2.11 | 2.105 | {SEED_SD} | 2.10 | 2.11 | 2.10 |\n"
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "results"], cwd=tmp_path, check=True)
    return tmp_path


def judge(root: Path):
    return verify(load_params(root / "params.yaml"), root)


OTHER = MACHINE | {"cpu": "Another CPU", "flags": ["avx2"]}


def test_an_untouched_checkout_reproduces_bit_for_bit(repo):
    v = judge(repo)
    assert v.ok and v.case.startswith("same machine class") and not v.changed
    assert report(v).endswith("reproduced bit for bit")


def test_the_same_machine_class_demands_bit_identity(repo):
    write(repo, LOSSES | {"names-mlp": LOSSES["names-mlp"] + 1e-9}, MACHINE)  # far within any tolerance
    v = judge(repo)
    assert not v.ok and "metrics/names-mlp.json" in v.changed
    assert "NOT BIT-IDENTICAL on the same machine class: " in report(v)


def test_another_cpu_within_tolerance_passes(repo):
    moved = {"names-bigram_counts": LOSSES["names-bigram_counts"] + COUNTED / 2, "names-mlp": LOSSES["names-mlp"]
             + FP32 / 2, "names-gpt": LOSSES["names-gpt"] + BF16_SEED_SD * SEED_SD / 2}  # fmt: skip
    write(repo, moved, OTHER)
    v = judge(repo)
    assert v.ok, report(v)
    assert v.case.startswith("another CPU") and "cpu: Some CPU → Another CPU" in v.machine
    text = report(v)
    assert text.endswith("reproduced within tolerance") and "| names-gpt | 2.100000 | 2.105000 |" in text


@pytest.mark.parametrize(
    "run, by", [("names-mlp", 3 * FP32), ("names-gpt", 3 * SEED_SD), ("names-bigram_counts", 1e-5)]
)
def test_beyond_tolerance_fails_naming_the_run_and_the_number(repo, run, by):
    write(repo, LOSSES | {run: LOSSES[run] + by}, OTHER)
    v = judge(repo)
    assert not v.ok
    assert {c.run for c in v.failed} == {run} and "val/loss" in {c.number for c in v.failed}
    assert f"BEYOND TOLERANCE: {run} val/loss: committed {LOSSES[run]}" in report(v)


def test_a_curve_beyond_tolerance_fails_even_when_the_final_numbers_hold(repo):
    write(repo, LOSSES, OTHER, curve_shift=10 * FP32)
    v = judge(repo)
    failed = {(c.run, c.number) for c in v.failed}
    assert ("names-mlp", "curve (largest point difference)") in failed and not v.ok


def test_a_flipped_conclusion_is_named(repo):
    """Two runs swapped: their numbers fail, and so do the conclusions they carry (the step's sign, the best run)."""
    write(repo, LOSSES | {"names-mlp": LOSSES["names-gpt"], "names-gpt": LOSSES["names-mlp"]}, OTHER)
    v = judge(repo)
    flipped = {c[0]: (c[1], c[2]) for c in v.flipped}
    assert flipped["names: names-gpt → names-mlp (val bpc)"] == ("worse", "better")  # (params.yaml's order)
    assert flipped["names: best run (val bpc)"] == ("names-gpt", "names-mlp")
    assert "CONCLUSION CHANGED: names: names-gpt → names-mlp (val bpc): committed 'worse', here 'better'" in report(v)


def test_a_best_run_within_noise_of_another_may_change_places(repo):
    """The best two runs closer than their tolerances: either may come out best on another CPU."""
    near = LOSSES | {"names-mlp": LOSSES["names-gpt"] + 0.002}  # the bf16 run's tolerance is 0.01
    write(repo, near, MACHINE)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "near"], cwd=repo, check=True)
    write(repo, near | {"names-gpt": near["names-gpt"] + 0.004}, OTHER)
    v = judge(repo)
    assert v.ok, report(v)
    assert ("names: best run (val bpc)", "names-gpt or names-mlp", "names-mlp") in v.claims


def test_a_missing_or_extra_run_is_named(repo):
    (repo / "metrics" / "names-mlp.json").unlink()
    (repo / "metrics" / "names-extra.json").write_text("{}")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], cwd=repo, check=True)
    v = judge(repo)
    assert "names-mlp: metrics/names-mlp.json is not committed" in v.problems
    assert "names-extra: committed, but not a run or baseline of the params" in v.problems and not v.ok


def test_the_machine_record_round_trips_and_tells_classes_apart(tmp_path):
    record = describe()
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(record))
    again = json.loads(path.read_text())
    assert same_class(record, again) and differences(record, again) == []
    assert set(record["flags"]) <= {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert not same_class(record, record | {"threads": record["threads"] + 1})
    assert (
        differences(record, record | {"onednn_max_isa": "AVX2"}) == ["onednn_max_isa:  → AVX2"]
        or record["onednn_max_isa"]
    )
    # MKL's code branch (MKL_CBWR) decides bits too; a record from before the key existed reads as MKL's default.
    unset = record | {"mkl_cbwr": ""}
    assert same_class({k: v for k, v in unset.items() if k != "mkl_cbwr"}, unset)
    assert differences(unset, unset | {"mkl_cbwr": "COMPATIBLE"}) == ["mkl_cbwr:  → COMPATIBLE"]


def test_lm_verify_exits_1_and_names_what_failed(repo):
    write(repo, LOSSES | {"names-mlp": LOSSES["names-mlp"] + 1.0}, OTHER)
    r = subprocess.run([sys.executable, "-m", "lm.cli", "verify"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 1 and "BEYOND TOLERANCE: names-mlp val/loss" in r.stdout, r.stdout + r.stderr


def test_a_classifier_may_move_one_example_per_split_and_no_more():
    from lm.verify import compare_classifier

    then = {"splits": {"test": {"examples": 300, "accuracy": 296 / 300, "f1": 0.9866}}}
    one = {"splits": {"test": {"examples": 300, "accuracy": 295 / 300, "f1": 0.9866}}}
    two = {"splits": {"test": {"examples": 300, "accuracy": 294 / 300, "f1": 0.9866}}}
    assert all(c.ok for c in compare_classifier("baseline b", then, one))
    checks = {c.number: c for c in compare_classifier("baseline b", then, two)}
    assert not checks["test/accuracy"].ok and checks["test/f1"].ok
    assert checks["test/accuracy"].tolerance == pytest.approx(1 / 300)
    assert not any(c.ok for c in compare_classifier("baseline b", then, {"splits": {}}))


def test_a_fine_tune_may_move_twice_its_seed_spread():
    from lm.verify import compare_classifier

    then = {"splits": {"test": {"examples": 300, "accuracy": 0.96, "f1": 0.96}}, "seeds": {"sd": 0.01}}
    within = {"splits": {"test": {"examples": 300, "accuracy": 0.941, "f1": 0.96}}}
    beyond = {"splits": {"test": {"examples": 300, "accuracy": 0.939, "f1": 0.96}}}
    assert all(c.ok for c in compare_classifier("finetune f", then, within, spread=0.01))
    checks = {c.number: c for c in compare_classifier("finetune f", then, beyond, spread=0.01)}
    assert not checks["test/accuracy"].ok and checks["test/accuracy"].tolerance == pytest.approx(0.02)
    assert checks["test/accuracy"].note == "2 seed sd"


def test_lm_verify_judges_the_committed_fine_tunes(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpora"]["sms"] = tiny_params()["corpora"]["sms"]
    params["finetune"] = {"f": {"run": "names-gpt", "corpus": "sms"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "finetune" / "metrics").mkdir(parents=True)
    m = {"splits": {"test": {"examples": 300, "accuracy": 0.96, "f1": 0.96}}, "seeds": {"sd": 0.005}}
    (repo / "finetune" / "metrics" / "f.json").write_text(json.dumps(m))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "f"], cwd=repo, check=True)
    assert judge(repo).ok
    m["splits"]["test"]["accuracy"] = 0.94  # 6 messages: beyond 2 seed sd (3 messages)
    (repo / "finetune" / "metrics" / "f.json").write_text(json.dumps(m))
    v = judge(repo)
    assert [(c.run, c.number) for c in v.failed] == [("finetune f", "test/accuracy")]
