"""How torch's OpenMP threads wait (lm/threads.py): ``import lm`` sets libgomp's spin count before torch loads, in
every entry point (the stages, ``lm``, the benchmarks), and never overrides the user's own setting or a torch that
is already loaded; bench.threads measures the settings end to end on a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lm import threads

from tiny import ROOT, tiny_params

OMP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in OMP} | env
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=clean,
                          cwd=ROOT, check=True)  # fmt: skip


def imported(stderr: str) -> list[str]:
    """Modules in the order their imports finished (``-X importtime`` prints a line as each one ends): lm.threads
    ends before torch exactly when it ran before torch was loaded (neither imports the other)."""
    return [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


@pytest.mark.parametrize("entry", ["stages.train", "lm.cli", "bench.train_speed", "lm.models"])
def test_every_entry_point_sets_the_spin_count_before_torch_loads(entry):
    """The stages and ``lm`` load torch later (or not at all: the imports are lazy); the benchmarks and lm.models load
    it at import, after lm.threads."""
    done = python(f"import {entry}, os; print(os.environ.get('GOMP_SPINCOUNT'))")
    order = imported(done.stderr)
    assert done.stdout.split() == [threads.SPIN_COUNT]
    assert "lm.threads" in order and ("torch" not in order or order.index("lm.threads") < order.index("torch"))


@pytest.mark.parametrize("var, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "42")])
def test_the_users_own_wait_setting_is_kept(var, value):
    done = python("import lm, os, json; print(json.dumps({v: os.environ.get(v) for v in lm.threads.WAIT_VARIABLES}))",
                  **{var: value})  # fmt: skip
    assert json.loads(done.stdout) == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None} | {var: value}


def test_nothing_changes_once_torch_is_loaded():
    done = python(
        "import torch, os; from lm import threads; print(threads.configure(), os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert done.stdout.split() == ["False", "None"]


def test_bench_threads_measures_each_setting_under_each_load(tmp_path):
    """bench.threads end to end on a tiny run: a row per setting, a column per load, two processes timed at once."""
    params = tiny_params({"gpt": {"tokenizer": "shakespeare-char", "model": {"family": "gpt", "block_size": 8,
                          "n_layer": 1, "n_head": 2, "n_embd": 16}, "train": {"max_steps": 10}}})  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "bench.threads", "--runs", "gpt", "--settings", "spin", "lm", "--params",
           str(tmp_path / "params.yaml"), "--steps", "3", "--seconds", "1", "--repeats", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| spin") or line.startswith("| lm")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == 8 for r in rows)
    assert "beside a busy loop" in done.stdout and "two at once" in done.stdout
