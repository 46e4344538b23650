"""`train.dtype: auto` (lm/precision.py): bf16 autocast only where bf16 is native, decided from the CPU's flags (fake
flag sets here), oneDNN's ISA limit, or a probe bounded in time; the warning for an explicit bf16 without native
support; the dtype a run resolved to recorded in train.json, the metrics and MLflow; benchmarks bounded on such a
CPU; a timed-out test command killed with everything it started."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from lm import precision
from lm.precision import Probe

from helpers import run

FAST_BF16 = Probe(float32=100e9, bfloat16=300e9)
SLOW_BF16 = Probe(float32=150e9, bfloat16=1.2e9)


def no_probe() -> Probe:
    raise AssertionError("the flags decide: no probe")


@pytest.mark.parametrize(
    "flags, onednn, expected",
    [
        ({"avx2", "fma"}, True, "float32"),  # AVX2 only (Zen 3, Intel before Cooper Lake)
        ({"avx512f", "avx512bw"}, True, "float32"),  # AVX-512 without its bf16 extension (Skylake-SP)
        ({"avx512f", "avx512_bf16"}, True, "bfloat16"),  # Zen 4/5, Cooper Lake
        ({"avx512f", "amx_bf16", "amx_tile"}, True, "bfloat16"),  # Sapphire Rapids
        ({"avx512f", "avx512_bf16", "amx_bf16"}, False, "float32"),  # ONEDNN_MAX_CPU_ISA=AVX2 on such a CPU
    ],
)
def test_auto_follows_the_cpu_flags(flags, onednn, expected):
    r = precision.resolve("auto", "cpu", flags=flags, onednn=onednn, measure=no_probe)
    assert r.dtype == expected and r.reason.startswith("auto: ")


@pytest.mark.parametrize("measured, expected", [(FAST_BF16, "bfloat16"), (SLOW_BF16, "float32")])
def test_without_flags_a_probe_decides(measured, expected):
    calls = []
    r = precision.resolve("auto", "cpu", flags=set(), onednn=True, measure=lambda: calls.append(1) or measured)
    assert r.dtype == expected and len(calls) == 1 and "GFLOP/s" in r.reason


def test_explicit_dtypes_are_kept_and_float32_never_probes():
    assert precision.resolve("float32", "cpu", flags=set(), measure=no_probe).dtype == "float32"
    warned = []
    r = precision.resolve("bfloat16", "cpu", flags={"avx512_bf16"}, onednn=True, measure=no_probe, warn=warned.append)
    assert r.dtype == "bfloat16" and not warned


def test_explicit_bf16_without_native_support_warns_once_naming_the_slowdown():
    warned = []
    r = precision.resolve("bfloat16", "cpu", flags={"avx2"}, onednn=True, measure=lambda: SLOW_BF16, warn=warned.append)
    assert r.dtype == "bfloat16"  # the user asked for it: kept, but told
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "125x slower" in warned[0] and "neither AVX512_BF16 nor AMX" in warned[0]
    assert "train.dtype: auto" in warned[0]


def test_the_probe_is_bounded_however_slow_the_matmul():
    def slow(a, b):  # a scalar bf16 fallback at its worst: each call a fifth of a second
        time.sleep(0.2)

    t0 = time.perf_counter()
    p = precision.probe(seconds=0.3, matmul=slow)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.3 + 2 * 0.2 + 0.3, elapsed  # the budget, plus at most one call per dtype (and slack)
    assert p.float32 > 0 and p.bfloat16 > 0


def test_the_gemm_peak_is_bounded_warm_up_included():
    from bench.mfu import gemm_peak

    def one_gflops(a, b):  # ~1 GFLOP/s: a 2048² call would take 17 s
        time.sleep(2 * a.shape[0] ** 3 / 1e9)

    t0 = time.perf_counter()
    peak = gemm_peak(torch.bfloat16, seconds=1.0, matmul=one_gflops)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0 + 0.5, elapsed
    assert 0.5e9 < peak < 1.1e9, peak


def test_an_unresolved_dtype_never_reaches_autocast():
    from lm.metrics import autocast

    with pytest.raises(ValueError, match="'auto'"):
        autocast("cpu", "auto")


class Tags:
    """A tracker that keeps the tags it is given."""

    def __init__(self):
        from lm.tracking import NullTracker

        self.null, self.tags = NullTracker(), {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def __getattr__(self, name):
        return getattr(self.null, name)


@pytest.fixture(scope="module")
def dtype_runs(tmp_path_factory, mirror: Path, request) -> tuple[Path, dict]:
    """The same tiny GPT trained four ways: float32, bfloat16, and auto on a CPU taken for one with native bf16 and
    for one without (lm.precision.cpu_native_bf16 replaced)."""
    from tiny import train_tiny

    root = tmp_path_factory.mktemp("dtype")
    text = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[:24000]
    splits = {"train": [text[:20000]], "val": [text[20000:]]}
    model = {"family": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32}
    tags = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, dtype, native in [("fp32", "float32", None), ("bf16", "bfloat16", None),
                                    ("auto-native", "auto", True), ("auto-avx2", "auto", False)]:  # fmt: skip
            if native is not None:
                mp.setattr(precision, "cpu_native_bf16", lambda *a, n=native, **k: (n, f"a fake CPU, native={n}"))
            tracker = Tags()
            train_tiny(root, name, splits, "text", {"kind": "char"}, model, logger=tracker, dtype=dtype)
            tags[name] = tracker.tags
    return root, tags


def test_auto_trains_in_what_it_resolved_to_and_records_it(dtype_runs):
    root, tags = dtype_runs
    info = {n: json.loads((root / "models" / n / "train.json").read_text()) for n in tags}
    assert {n: i["dtype"] for n, i in info.items()} == {
        "fp32": "float32", "bf16": "bfloat16", "auto-native": "bfloat16", "auto-avx2": "float32"
    }  # fmt: skip
    # auto is exactly the dtype it resolved to: the same numbers, bit for bit; and bf16 is not fp32.
    assert info["auto-avx2"]["val_loss"] == info["fp32"]["val_loss"]
    assert info["auto-native"]["val_loss"] == info["bf16"]["val_loss"] != info["fp32"]["val_loss"]
    assert tags["auto-avx2"]["dtype"] == "float32" and "native=False" in tags["auto-avx2"]["dtype.reason"]
    assert tags["auto-native"]["dtype"] == "bfloat16"
    config = json.loads((root / "models" / "auto-avx2" / "config.json").read_text())
    assert config["run"]["train"]["dtype"] == "float32", config  # the checkpoint says what it was trained in


def test_the_metrics_say_which_dtype_a_number_came_from(dtype_runs):
    from lm.config import EvaluateConfig
    from lm.evaluate import evaluate_run

    root, _ = dtype_runs
    cfg = EvaluateConfig(num_names=0, num_passages=0, quality_prompts=0)
    m = evaluate_run("auto-native", root / "models" / "auto-native", root / "tokenizers" / "auto-native-tok", cfg,
                     root / "m.json", root / "s.txt", root / "i.safetensors", device="cpu")  # fmt: skip
    assert m["train/dtype"] == "bfloat16"


def test_a_timed_out_command_is_killed_with_everything_it_started(tmp_path):
    pid_file = tmp_path / "grandchild"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    with pytest.raises(AssertionError, match="no end after 3 s, killed"):
        run([sys.executable, "-c", code], timeout=3)
    grandchild = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # SIGKILL is delivered when the killed process next runs: on a loaded machine that can take a moment.
    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone()
