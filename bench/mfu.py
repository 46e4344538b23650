"""Model FLOPs utilisation: the machine's matmul peak (a GEMM probe, and the datasheet on a known GPU), the model's
FLOPs per token, and the machine line every benchmark prints. Measured figures, never tests."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.config import TrainConfig

DATASHEET_TFLOPS = {  # dense (no sparsity) peaks, TFLOP/s: (bf16 tensor cores, tf32 tensor cores, fp32 tf32 off)
    "H100 SXM": (989.0, 494.7, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 494.7, 67.0),
    "H200": (989.0, 494.7, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L4": (121.0, 60.0, 30.3),
    "A10": (125.0, 62.5, 31.2),
    "RTX 4090": (165.0, 82.6, 82.6),
}
BF16_NATIVE_OVER_FP32 = 3.0
"""A CPU with native bf16 matmuls that measures less than this ratio of bf16 to fp32 peak is throttled or shared
(docs/performance.md)."""


def gemm_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 1.0) -> float:
    """Best measured FLOP/s of an n×n @ n×n matmul in `dtype` (warm-up first, then repeated timing)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        reps = 4
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
    return best


def datasheet_peak(device: str) -> dict[str, float] | None:
    """The CUDA device's datasheet dense peak in FLOP/s by dtype, if its name is in the table."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, tf32, fp32) in DATASHEET_TFLOPS.items():
        if key in name:
            return {"bfloat16": bf16 * 1e12, "tf32": tf32 * 1e12, "float32": fp32 * 1e12, "name": name}
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def bf16_caveat(bf16_over_fp32: float, flags: set[str]) -> str:
    """A warning when a CPU with native bf16 matmuls (AVX512_BF16 or AMX) measures under
    :data:`BF16_NATIVE_OVER_FP32` times its fp32 peak in bf16: it is throttled or shared, which halves bf16's
    edge and moves every race result."""
    if bf16_over_fp32 >= BF16_NATIVE_OVER_FP32 or not flags & {"avx512_bf16", "amx_bf16"}:
        return ""
    return (
        f"**Warning:** this CPU has native bf16 matmuls, yet bf16 measured only {bf16_over_fp32:.1f}x fp32 "
        "(about 4x when the machine is quiet): it is throttled or shared, so bf16 numbers here are low."
    )


def flops_per_token(model_cfg, vocab_size: int) -> int:
    """Training FLOPs per token, 6N + 12·n_layer·n_embd·ctx (lm.model_size, PaLM appendix B)."""
    from lm.model_size import param_report

    return int(param_report(model_cfg, vocab_size).flops_per_token)


def machine() -> str:
    """The machine line of a benchmark's table: processor, cores, torch and its threads."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


@dataclass(frozen=True)
class Peaks:
    """The matmul peaks MFU divides by: measured (fp32 and bf16) on `device`, and the datasheet's where known."""

    device: str
    measured: dict[str, float]
    sheet: dict[str, float] | None

    @classmethod
    def measure(cls, device: str) -> Peaks:
        measured = {"float32": gemm_peak(torch.float32, device), "bfloat16": gemm_peak(torch.bfloat16, device)}
        return cls(device, measured, datasheet_peak(device))

    def for_run(self, cfg: TrainConfig) -> tuple[float, str]:
        """MFU's denominator for a run and its label: on a CUDA device in the datasheet table its datasheet peak
        for the run's math (bf16, or TF32 tensor cores for float32 with train.tf32), else the measured peak."""
        if self.sheet and torch.device(cfg.device if cfg.device != "auto" else self.device).type == "cuda":
            kind = "tf32" if cfg.dtype == "float32" and cfg.tf32 else cfg.dtype
            return self.sheet[kind], f"{kind} datasheet"
        return self.measured[cfg.dtype], cfg.dtype

    def lines(self) -> list[str]:
        """What a table's header says of the peaks (and a warning when a bf16 CPU measures throttled)."""
        fp32, bf16 = self.measured["float32"], self.measured["bfloat16"]
        line = (
            f"Measured matmul peak (2048², best of repeats): fp32 {fp32 / 1e9:,.0f} GFLOP/s, "
            f"bf16 {bf16 / 1e9:,.0f} GFLOP/s (bf16/fp32 {bf16 / fp32:.1f}x)"
        )
        if self.sheet:
            line += (
                f"; datasheet {self.sheet['name']}: bf16 {self.sheet['bfloat16'] / 1e12:,.0f}, "
                f"fp32 {self.sheet['float32'] / 1e12:,.0f} TFLOP/s"
            )
        out = [line, ""]
        if self.device == "cpu" and (caveat := bf16_caveat(bf16 / fp32, cpu_flags())):
            out += [caveat, ""]
        return out
