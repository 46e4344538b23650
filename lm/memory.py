"""Will a model fit in this machine's memory? Answered before anything is allocated, from the parameter count on
the meta device: a model past the machine's memory otherwise allocates until the kernel kills the process (no
message) or fails deep in the allocator.

Training on a CPU holds, per parameter, the fp32 weights, their gradients and AdamW's two moments (16 bytes), plus
the activations of one batch. The activation estimate is Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 2: ``s·b·h·(34 + 5·a·s/h)`` bytes per layer with 16-bit
activations), doubled for fp32, plus the logits, their softmax and their gradient (``3·b·s·V`` floats). It is an
estimate (the families below a transformer hold less), so the check refuses only what cannot fit, and says how
much it asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TRAIN_BYTES_PER_PARAM = 16
"""fp32 weights (4), gradients (4) and AdamW's first and second moments (8)."""
INFER_BYTES_PER_PARAM = 4
"""fp32 weights: what sampling, evaluation and export hold."""


class TooBig(ValueError):
    """The model needs more memory than the machine has available; the message names both and the fix."""


@dataclass(frozen=True)
class Need:
    """Bytes a model needs: ``weights`` (the per-parameter part) and ``activations`` (one batch)."""

    params: int
    weights: int
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.activations


def training_need(params: int, cfg, batch_size: int, vocab_size: int) -> Need:
    """What training `params` parameters of model config `cfg` at `batch_size` needs (module docstring)."""
    s, b = int(getattr(cfg, "block_size", 1)), batch_size
    h, layers = int(getattr(cfg, "n_embd", 0) or 0), int(getattr(cfg, "n_layer", 1) or 1)
    a = int(getattr(cfg, "n_head", 1) or 1)
    per_layer = 2 * s * b * (34 * h + 5 * a * s) if h else 0
    logits = 3 * b * s * vocab_size * 4
    return Need(params, params * TRAIN_BYTES_PER_PARAM, per_layer * layers + logits)


def inference_need(params: int) -> Need:
    return Need(params, params * INFER_BYTES_PER_PARAM)


def available(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, or the cgroup's limit minus its use
    where that is lower (a container); None where neither can be read (the check is then skipped)."""
    found = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check(need: Need, what: str, fix: str, free: int | None = None) -> None:
    """Raise :class:`TooBig` when `need` is more than the memory available (`free`, else :func:`available`).

    `what` says what needs it ("training", "loading the checkpoint"); `fix` how to need less."""
    if os.environ.get("LM_MEMORY_CHECK", "") == "off":
        return
    free = available() if free is None else free
    if free is None or need.total <= free:
        return
    parts = f"weights, gradients and AdamW moments {gb(need.weights)}" if need.activations else "its weights"
    if need.activations:
        parts += f", activations about {gb(need.activations)}"
    raise TooBig(
        f"the model has {need.params:,} parameters; {what} needs about {gb(need.total)} ({parts}) and this "
        f"machine has {gb(free)} available: {fix} (LM_MEMORY_CHECK=off skips this check)"
    )


def count_params(cfg, vocab_size: int) -> int:
    """Parameters of model config `cfg` at `vocab_size`, counted on the meta device (nothing allocated; a tied
    tensor once)."""
    from lm.model_size import build_meta, count

    return count(build_meta(cfg, vocab_size)).total


def check_training(run, vocab_size: int, device=None, free: int | None = None) -> None:
    """Raise :class:`TooBig` when training `run` (a RunConfig) cannot fit in the memory of `device` (a CUDA device:
    its free memory; else this machine's). A counted model's size depends on its data: not checked here."""
    if run.model.fitting != "gradient":
        return
    if free is None and device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info(device)[0]
    need = training_need(count_params(run.model, vocab_size), run.model, run.train.batch_size, vocab_size)
    check(need, "training", "make the model smaller (n_embd, n_layer, block_size) or train.batch_size", free)


def study_problems(study, tokenizers_dir: Path, free: int | None = None) -> list[str]:
    """One line per run of `study` (a StudyConfig) that cannot be trained in this machine's memory. The vocabulary
    is the built tokenizer's where it exists, else the configured BPE size, else 256 (a character vocabulary)."""
    import json

    free = available() if free is None else free
    if free is None:
        return []
    problems = []
    for name, run in study.runs.items():
        stats = Path(tokenizers_dir) / run.tokenizer / "stats.json"
        try:
            vocab = int(json.loads(stats.read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            vocab = study.tokenizers[run.tokenizer].vocab_size or 256
        try:
            check_training(run, vocab, free=free)
        except TooBig as e:
            problems.append(f"runs.{name}: {e}")
    return problems


def study_error(params_file: object, problems: list[str]) -> str:
    """The one error `lm check-params` and the check stage give for the runs :func:`study_problems` names."""
    head = f"{params_file}: {len(problems)} run(s) cannot be trained in this machine's memory:"
    return "\n  ".join([head, *problems])
