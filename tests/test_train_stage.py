"""The train stage for real, in subprocesses.

* Killed with SIGKILL (or sent SIGINT, as Ctrl-C does) after it saved a training state, then run
  again: the second run resumes and ends bit-identical to a run that was never interrupted;
  meanwhile the stage's outputs never exist, so DVC sees the stage as not run.
* Diverging: the stage fails naming the step and the last good checkpoint.
* Under torchrun with 2 CPU processes (gloo): the same loss curve as one process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import finish, saved_step, stage, wait_for_state
from tiny import GPT_RUN, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory, repo_root: Path, mirror: Path) -> Path:
    """shakespeare fetched and char-tokenized by the real stages, tracking off."""
    d = tmp_path_factory.mktemp("resume")
    params = tiny_params({"gpt": GPT_RUN}, tokenizers=["shakespeare-char"], tracking=False)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["LM_DATA_MIRROR"] = str(mirror)
    for args in (
        ["stages.fetch", "shakespeare", "--out", "data/shakespeare"],
        ["stages.tokenize", "shakespeare-char", "--data", "data/shakespeare", "--out", "tokenizers/shakespeare-char"],
    ):
        code, _, err = finish(stage(d, *args))
        assert code == 0, err
    return d


def train(work: Path, out: str) -> subprocess.Popen:
    return stage(
        work,
        "stages.train",
        "gpt",
        "--tokenizer",
        "tokenizers/shakespeare-char",
        "--out",
        f"models/{out}",
        "--curve",
        f"curves/{out}.csv",
        "--no-progress",
    )


def same_result(work: Path, a: str, b: str) -> None:
    """Bit-identical weights, train.json and curves."""
    for f in ("model.safetensors", "train.json", "config.json"):
        assert (work / "models" / a / f).read_bytes() == (work / "models" / b / f).read_bytes(), f
    assert (work / "curves" / f"{a}.csv").read_bytes() == (work / "curves" / f"{b}.csv").read_bytes()


@pytest.fixture(scope="module")
def reference(work: Path) -> str:
    code, _, err = finish(train(work, "ref"))
    assert code == 0, err
    assert not (work / "models" / ".ref.resume").exists()  # removed once the outputs are complete
    return "ref"


def test_sigkill_then_rerun_resumes_bit_identical(work, reference):
    state = work / "models" / ".killed.resume"
    p = train(work, "killed")
    wait_for_state(p, state, 200)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = saved_step(state)
    assert 200 <= step < GPT_RUN["train"]["max_steps"]
    # Nothing that looks like a finished run: DVC would re-run the stage.
    assert not (work / "models" / "killed").exists() and not (work / "curves" / "killed.csv").exists()

    code, _, err = finish(train(work, "killed"))
    assert code == 0, err
    assert f"resuming from models/.killed.resume at step {step}/" in err or f"at step {step}/" in err
    same_result(work, reference, "killed")
    assert not state.exists()


def test_ctrl_c_saves_the_state_exits_cleanly_and_resumes(work, reference):
    state = work / "models" / ".int.resume"
    p = train(work, "int")
    wait_for_state(p, state, 200)
    p.send_signal(signal.SIGINT)
    code, out, err = finish(p)
    assert code == 130, err
    m = err.strip().splitlines()[-1]
    assert m.startswith("error: train@gpt: interrupted at step ") and "run the stage again to resume" in m
    step = int(m.split("interrupted at step ")[1].split("/")[0])
    assert saved_step(state) == step  # saved at the step it stopped, not only at the last interval
    assert "Traceback" not in err and not (work / "models" / "int").exists()

    code, _, err = finish(train(work, "int"))
    assert code == 0 and f"at step {step}/" in err, err
    same_result(work, reference, "int")


def test_divergence_fails_the_stage_keeping_the_last_good_state(work):
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["runs"]["gpt"]["train"].update(
        optimizer="sgd", lr=100.0, warmup_steps=300, grad_clip=0.0, max_steps=300, checkpoint_interval=5
    )
    (work / "diverge.yaml").write_text(yaml.safe_dump(params))
    p = stage(
        work,
        "stages.train",
        "gpt",
        "--params",
        "diverge.yaml",
        "--tokenizer",
        "tokenizers/shakespeare-char",
        "--out",
        "models/div",
        "--curve",
        "curves/div.csv",
        "--no-progress",
    )
    code, _, err = finish(p)
    assert code == 1 and "Traceback" not in err, err
    state = work / "models" / ".div.resume"
    assert f"the last good checkpoint is {state.relative_to(work)} (step {saved_step(state)})" in err, err
    assert "loss became" in err and "lower train.lr" in err
    assert not (work / "models" / "div").exists() and not (work / "curves" / "div.csv").exists()


def curve(path: Path) -> list[dict[str, float]]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_torchrun_two_processes_match_one(work):
    """Same global batch (8), split 4 + 4 over two gloo processes: per-step train loss and the val
    loss within 1e-4 of the single process (only the order of floating-point sums differs)."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["runs"]["gpt"]["model"]["dropout"] = 0.0  # dropout masks would depend on the micro-batch shape
    params["runs"]["gpt"]["train"].update(max_steps=30, eval_interval=1, checkpoint_interval=10)
    (work / "ddp.yaml").write_text(yaml.safe_dump(params))
    args = [
        "stages.train",
        "gpt",
        "--params",
        "ddp.yaml",
        "--tokenizer",
        "tokenizers/shakespeare-char",
        "--no-progress",
    ]
    code, _, err = finish(stage(work, *args, "--out", "models/one", "--curve", "curves/one.csv"))
    assert code == 0, err
    code, out, err = finish(
        stage(
            work,
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            *args,
            "--out",
            "models/two",
            "--curve",
            "curves/two.csv",
        )
    )
    assert code == 0, err
    assert out.count("train@gpt:") == 1  # rank 0 alone reports and writes
    one, two = curve(work / "curves" / "one.csv"), curve(work / "curves" / "two.csv")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 31))
    gaps = {k: max((abs(a[k] - b[k]), int(a["step"])) for a, b in zip(one, two)) for k in ("train_loss", "val_loss")}
    print(
        f"torchrun 2 x gloo vs 1 process, 30 steps: max |train loss gap| {gaps['train_loss'][0]:.2e}, "
        f"max |val loss gap| {gaps['val_loss'][0]:.2e}"
    )  # shown with pytest -s
    assert all(gap < 1e-4 for gap, _ in gaps.values()), f"largest gap (size, step) per loss: {gaps}"
    assert one[-1]["train_loss"] < one[0]["train_loss"] - 0.3  # it did learn
    assert not (work / "models" / ".two.resume").exists()


def test_bench_train_runs_and_prints_its_tables(work):
    """Not a timing test: the benchmark's code paths (GEMM probe, a run, the reference race) work."""
    code, out, err = finish(stage(work, "bench.train_speed", "--run", "gpt", "--warmup", "1", "--steps", "2"))
    assert code == 0, err
    assert "Measured matmul peak" in out and "| gpt |" in out and "MFU" in out
    code, out, err = finish(
        stage(
            work,
            "bench.train_speed",
            "--reference",
            "--study-run",
            "gpt",
            "--iters",
            "12",
            "--warmup",
            "1",
            "--steps",
            "2",
        )
    )
    assert code == 0, err
    assert "Throughput ratio:" in out and "Same wall-clock as the reference's 12 iterations" in out
    assert "val loss" in out and not (work / "reports").exists()  # --write only when asked


def test_bench_train_race_times_each_contestant_to_the_references_loss(work):
    """``--race``: the reference's seeds set the target and the clock; each contestant's seeds are scored at every
    checkpoint, and its time to target is its training time up to the first checkpoint at or under the target, where it
    stops. 'together' is LLaMA's block with a schedule over a share of the clock and both warm-ups."""
    args = ["--race", "--study-run", "gpt", "--seeds", "2", "--iters", "20", "--race-steps", "30", "--checkpoint", "10",
            "--lever", "study", "fp32", "together"]  # fmt: skip
    code, out, err = finish(stage(work, "bench.train_speed", *args))
    assert code == 0, err
    target = float(re.search(r"iterations, \*\*([0-9.]+)\*\*", out).group(1))
    clock = float(re.search(r"mean training time \*\*([0-9.]+) s\*\*", out).group(1))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    refs = [r for r in rows if r[0].startswith("reference")]
    study = [r for r in rows if r[0].startswith(("study:", "fp32:", "together:"))]
    assert len(refs) == 2 and len(study) == 6 and "float32" in study[2][0]
    budget = float(re.search(r"lr over ([0-9.]+) s", study[-1][0]).group(1))
    assert "batch 8+ over 100 steps" in study[-1][0] and "window 16+ over 100 steps" in study[-1][0]
    assert abs(budget - 0.3 * clock) < 0.06 and float(study[-1][4]) < budget + 5  # its budget: 0.3 of the clock
    assert abs(sum(float(r[5]) for r in refs) / 2 - target) < 1e-4  # the target: the reference's mean loss
    assert abs(sum(float(r[4]) for r in refs) / 2 - clock) < 0.1  # the clock: its mean time (cells rounded to 0.1 s)
    for r in study:
        if r[6] == "not reached":
            assert float(r[5]) > target and r[7] == "-"  # never reached: its last checkpoint is above the target
        else:
            reach, ratio = float(r[6].split()[0]), float(r[7].rstrip("x"))
            assert abs(ratio * reach - clock) <= 0.06 * ratio + 0.06  # cells rounded to 0.1 s
            assert r[6] == f"{r[4]} (step {r[3]})" and float(r[5]) <= target  # it stopped at the target
    assert "- **study:" in out and "- **fp32:" in out and "- **together:" in out


def test_bench_train_speed_says_bf16_is_unavailable_where_it_is_not_native(work):
    """On a CPU without native bf16 (oneDNN held to AVX2 here, as on an AVX2-only machine) the GEMM probe stays
    within its bound and the benchmark says bf16 is unavailable instead of measuring it for minutes."""
    t0 = time.perf_counter()
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    code, out, err = finish(stage(work, "bench.train_speed", "--run", "gpt", "--warmup", "1", "--steps", "2", env=env))
    assert code == 0, err
    assert "bf16 is unavailable here" in out and "| gpt |" in out and time.perf_counter() - t0 < 120
