"""The machine a pipeline ran on, as far as it decides the numbers: the CPU model and the flags that pick kernels,
the thread count, and the versions of torch and of the libraries it computes with (oneDNN, MKL). The report stage
writes it to reports/machine.json, so the commit records which machine made its results and `lm verify` can tell
a reader whether to expect the same bits ("same machine class") or numbers within tolerance ("another CPU")."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
"""x86 flags oneDNN and MKL choose kernels by (so the order of floating-point sums, so the last bits)."""

CLASS_KEYS = (
    "cpu", "flags", "threads", "torch", "onednn", "mkl", "machine", "cpu_capability", "onednn_max_isa", "mkl_cbwr"
)  # fmt: skip
"""What two records must share to be the same machine class: bit-identical results are expected then. A key a
record lacks (one written before the key existed) reads as "" (the library's default)."""


def _config_version(pattern: str) -> str:
    import torch

    match = re.search(pattern, torch.__config__.show())
    return match.group(1) if match else ""


def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """This machine's record (JSON-ready)."""
    import torch

    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onednn": _config_version(r"MKL-DNN v([\d.]+)"),
        "mkl": _config_version(r"Math Kernel Library Version ([\w.\-]+)"),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATEN_CPU_CAPABILITY caps it
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),  # MKL's code branch (bench.bitwise)
    }


def same_class(a: dict, b: dict) -> bool:
    """Whether records `a` and `b` describe machines that give the same bits (same CLASS_KEYS)."""
    return all(a.get(k, "") == b.get(k, "") for k in CLASS_KEYS)


def differences(a: dict, b: dict) -> list[str]:
    """'key: a → b' for each CLASS_KEYS entry that differs."""
    return [f"{k}: {a.get(k, '')} → {b.get(k, '')}" for k in CLASS_KEYS if a.get(k, "") != b.get(k, "")]
