"""Model FLOPs utilisation: the machine's matmul peak (a GEMM probe, and the datasheet on a known GPU), the model's
FLOPs per token, and the machine line every benchmark prints. Measured figures, never tests."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import torch

from lm.config import TrainConfig
from lm.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_native_bf16

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


def gemm_peak(
    dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 1.0, matmul=torch.matmul
) -> float:
    """Best measured FLOP/s of a square matmul in `dtype`, within `seconds` warm-up included. The size starts at
    256 and doubles up to `n` only while a call of the next size is predicted to fit what is left of the budget,
    and the clock is checked between calls: on a CPU whose bf16 matmul is a scalar fallback (~1 GFLOP/s, where one
    2048² call takes seconds) it stays small and still ends on time. Calls are timed in batches that double while
    a batch takes under 5 ms, so a fast GPU's launch and sync overhead does not hide its peak."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    deadline = time.perf_counter() + seconds
    best, size = 0.0, min(256, n)
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        # Half of what is left for each size below the largest, all of it for the largest.
        stop = deadline if size >= n else time.perf_counter() + (deadline - time.perf_counter()) / 2
        reps, batch = 1, 0.0
        while True:
            t0 = time.perf_counter()
            for _ in range(reps):
                matmul(a, b)
            sync()
            batch = time.perf_counter() - t0
            best = max(best, reps * 2 * size**3 / max(batch, 1e-9))
            if time.perf_counter() >= stop:
                break
            if batch < 5e-3:
                reps *= 2
        per_call = batch / reps
        if size >= n or time.perf_counter() + 8 * per_call > deadline:  # 2x the size: 8x the work
            return best
        size *= 2


def datasheet_peak(device: str) -> dict[str, float] | None:
    """The CUDA device's datasheet dense peak in FLOP/s by dtype, if its name is in the table."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, (bf16, tf32, fp32) in DATASHEET_TFLOPS.items():
        if key in name:
            return {"bfloat16": bf16 * 1e12, "tf32": tf32 * 1e12, "float32": fp32 * 1e12, "name": name}
    return None


def bf16_caveat(bf16_over_fp32: float, flags: set[str]) -> str:
    """A warning when a CPU with native bf16 matmuls (AVX512_BF16 or AMX) measures under
    :data:`BF16_NATIVE_OVER_FP32` times its fp32 peak in bf16: it is throttled or shared, which halves bf16's
    edge and moves every race result."""
    if bf16_over_fp32 >= BF16_NATIVE_OVER_FP32 or not flags & NATIVE_BF16_FLAGS:
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
    """The matmul peaks MFU divides by: measured (fp32 and bf16) on `device`, and the datasheet's where known;
    whether bf16 is native there (lm.precision), and why."""

    device: str
    measured: dict[str, float]
    sheet: dict[str, float] | None
    bf16_native: bool = True
    bf16_why: str = ""

    @classmethod
    def measure(cls, device: str) -> Peaks:
        measured = {"float32": gemm_peak(torch.float32, device), "bfloat16": gemm_peak(torch.bfloat16, device)}
        if device.startswith("cuda"):
            native, why = torch.cuda.is_bf16_supported(), torch.cuda.get_device_name()
        else:
            native, why = cpu_native_bf16()
        return cls(device, measured, datasheet_peak(device), native, why)

    def for_run(self, cfg: TrainConfig) -> tuple[float, str]:
        """MFU's denominator for a run (its dtype resolved) and its label: on a CUDA device in the datasheet table
        its datasheet peak for the run's math (bf16, or TF32 tensor cores for float32 with train.tf32), else the
        measured peak."""
        if self.sheet and torch.device(cfg.device if cfg.device != "auto" else self.device).type == "cuda":
            kind = "tf32" if cfg.dtype == "float32" and cfg.tf32 else cfg.dtype
            return self.sheet[kind], f"{kind} datasheet"
        return self.measured[cfg.dtype], cfg.dtype

    def lines(self) -> list[str]:
        """What a table's header says of the peaks (and a warning when a bf16 CPU measures throttled, or a
        note that bf16 is not native here)."""
        fp32, bf16 = self.measured["float32"], self.measured["bfloat16"]
        line = (
            f"Measured matmul peak (square, up to 2048², 1 s each): fp32 {fp32 / 1e9:,.0f} GFLOP/s, "
            f"bf16 {bf16 / 1e9:,.1f} GFLOP/s (bf16/fp32 {bf16 / fp32:.2g}x)"
        )
        if self.sheet:
            line += (
                f"; datasheet {self.sheet['name']}: bf16 {self.sheet['bfloat16'] / 1e12:,.0f}, "
                f"fp32 {self.sheet['float32'] / 1e12:,.0f} TFLOP/s"
            )
        out = [line, ""]
        if not self.bf16_native:
            out += [
                f"**bf16 is unavailable here** ({self.bf16_why}): its matmuls run "
                f"{fp32 / bf16:,.0f}x slower than fp32, so configurations with bf16 autocast are skipped and "
                "`train.dtype: auto` trains in fp32.",
                "",
            ]
        elif self.device == "cpu" and (caveat := bf16_caveat(bf16 / fp32, cpu_flags() or set())):
            out += [caveat, ""]
        return out
