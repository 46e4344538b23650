"""Which dtype the forward pass autocasts to: ``train.dtype: auto`` resolved for the machine at hand.

bf16 autocast roughly doubles a small model's training speed where the hardware multiplies bf16 natively (CUDA
GPUs from Ampere on; x86 CPUs with AVX512_BF16 or AMX: Intel from Cooper Lake and Sapphire Rapids, AMD from Zen 4).
Elsewhere torch falls back to a scalar bf16 matmul that is two orders of magnitude slower than fp32 (on an
AVX2-only CPU), so ``auto`` trains in fp32 there. The decision comes from the CPU's flags where the kernel lists
them (x86 Linux), and from a short probe bounded in time everywhere else; oneDNN's own ISA limit
(``ONEDNN_MAX_CPU_ISA``, honoured by torch) counts as well, so a machine told to use AVX2 only is a machine
without native bf16. The resolved dtype is what train.json, the metrics and MLflow record.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""x86 flags (/proc/cpuinfo) of a CPU whose bf16 matmuls run on bf16 hardware: AVX512_BF16 dot products, AMX tiles."""

PROBE_SECONDS = 0.5
"""The probe's budget, both dtypes together. It checks the clock between matmuls and its matmuls are small
(PROBE_N), so even the slow fallback overruns the budget by at most one ~30 ms call per dtype."""

PROBE_N = 256
"""The probe's square matmul size: milliseconds in fp32 anywhere, tens of milliseconds in a scalar bf16 fallback."""

NATIVE_MIN_RATIO = 1.0
"""The probe calls bf16 native when its matmul is at least as fast as fp32's (native bf16 is 2-4x faster, the
fallback ~100x slower: the threshold is far from both)."""


@dataclass(frozen=True)
class Probe:
    """Measured matmul throughput in FLOP/s of each dtype (PROBE_N square, best call within the budget)."""

    float32: float
    bfloat16: float

    @property
    def bf16_over_fp32(self) -> float:
        return self.bfloat16 / self.float32

    def describe(self) -> str:
        return (
            f"a {PROBE_N}² bf16 matmul measured {self.bfloat16 / 1e9:,.1f} GFLOP/s here against "
            f"{self.float32 / 1e9:,.1f} in fp32 ({_times(self.bf16_over_fp32)})"
        )


@dataclass(frozen=True)
class Resolved:
    """The dtype a run trains in and why (one line, for the log and MLflow)."""

    dtype: str
    reason: str


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x as fast" if ratio >= 1 else f"{1 / ratio:,.0f}x slower"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The x86 CPU's feature flags from /proc/cpuinfo; None where the kernel lists none (macOS, ARM's
    'Features' lines), so the caller knows to probe instead."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return flags or None


def onednn_allows_bf16() -> bool:
    """Whether oneDNN will run bf16 kernels here: False when ``ONEDNN_MAX_CPU_ISA`` caps it below AVX-512 (or on
    a torch built without oneDNN), whatever the CPU has."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def probe(
    seconds: float = PROBE_SECONDS, matmul: Callable[[torch.Tensor, torch.Tensor], object] = torch.matmul
) -> Probe:
    """Best FLOP/s of a PROBE_N² matmul in fp32 and in bf16, each within half of `seconds`: the clock is checked
    before every call, so the probe ends within `seconds` plus one call per dtype, however slow the call."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(PROBE_N, PROBE_N).to(dtype), torch.randn(PROBE_N, PROBE_N).to(dtype)
        t_end, rate = time.perf_counter() + seconds / 2, 0.0
        while True:
            t0 = time.perf_counter()
            matmul(a, b)
            t1 = time.perf_counter()
            rate = max(rate, 2 * PROBE_N**3 / max(t1 - t0, 1e-9))
            if t1 >= t_end:
                break
        best[str(dtype).removeprefix("torch.")] = rate
    return Probe(**best)


def cpu_native_bf16(flags: set[str] | None = None, onednn: bool | None = None, measure=probe) -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and how that was decided. `flags` None: read /proc/cpuinfo;
    where it lists no flags, `measure()` decides."""
    flags = cpu_flags() if flags is None else flags
    onednn = onednn_allows_bf16() if onednn is None else onednn
    if flags:
        have = sorted(f.upper() for f in flags & NATIVE_BF16_FLAGS)
        if have and onednn:
            return True, f"the CPU has {' and '.join(have)}"
        if have:
            return False, f"the CPU has {' and '.join(have)}, but ONEDNN_MAX_CPU_ISA keeps oneDNN below it"
        return False, "the CPU has neither AVX512_BF16 nor AMX"
    p = measure()
    return p.bf16_over_fp32 >= NATIVE_MIN_RATIO, p.describe()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resolve(
    requested: str,
    device: torch.device | str,
    flags: set[str] | None = None,
    measure: Callable[[], Probe] = probe,
    warn: Callable[[str], None] = _warn,
    onednn: bool | None = None,
) -> Resolved:
    """The dtype ``train.dtype`` means on `device`: 'auto' is bf16 where bf16 is native (CUDA with bf16 support,
    a CPU per :func:`cpu_native_bf16`) and fp32 elsewhere (MPS included: its bf16 autocast is not what the study
    measured). An explicit 'bfloat16' on a CPU without native bf16 is kept, with a warning that names the probe's
    measured slowdown, before any training starts. `flags`, `onednn`, `measure`: as :func:`cpu_native_bf16`
    takes them (None: this machine's)."""
    kind, measure = torch.device(device).type, functools.cache(measure)  # one probe at most
    if requested == "float32":
        return Resolved("float32", "train.dtype is float32")
    if kind == "cuda":
        native, why = torch.cuda.is_bf16_supported(), f"CUDA device {torch.cuda.get_device_name()}"
    elif kind == "cpu":
        native, why = cpu_native_bf16(flags, onednn, measure)
    else:
        native, why = False, f"{kind}: the study trains in fp32 there"
    if requested == "auto":
        return Resolved("bfloat16" if native else "float32", f"auto: {why}")
    if kind == "cpu" and not native:
        warn(
            f"train.dtype is bfloat16 but this CPU has no native bf16 ({why}): {measure().describe()}; "
            "expect training to be slow. Set train.dtype: auto (or float32) to train in fp32 here."
        )
    return Resolved("bfloat16", f"train.dtype is bfloat16 ({why})")
