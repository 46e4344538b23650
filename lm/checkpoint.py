"""Checkpoints are safetensors + a JSON config: nothing is ever unpickled.

``<dir>/model.safetensors`` holds the tensors, ``<dir>/config.json`` the run configuration, the
vocabulary size and the parameter count, enough to rebuild the model before loading the tensors.
A checkpoint whose tensors do not match its config is rejected with the mismatching names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from lm.config import RunConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match its config."""


def save(model: torch.nn.Module, run: RunConfig, vocab_size: int, out_dir: Path) -> None:
    """Write the model's tensors and config into `out_dir` (which the caller renames into place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_model de-duplicates tied tensors (lm_head.weight is wte.weight), which save_file refuses.
    save_model(model, str(out_dir / WEIGHTS))
    meta = {
        "run": run.model_dump(mode="json"),
        "vocab_size": vocab_size,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
    }
    (out_dir / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load(ckpt_dir: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig, int]:
    """Rebuild the model from config.json and load its tensors (strictly); returns (model, run, vocab_size)."""
    from lm.models import build_model

    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / CONFIG).read_text())
        run = RunConfig.model_validate(meta["run"])
        vocab_size = int(meta["vocab_size"])
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir / CONFIG} not found: run the train stage for this run first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt_dir / CONFIG} is not a valid checkpoint config: {e}") from None
    model = build_model(run.model, vocab_size)
    weights = ckpt_dir / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights} not found: run the train stage for this run first")
    try:
        # load_model knows a tied tensor is stored once; we report missing/unexpected names ourselves.
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{ckpt_dir} does not match its config.json: {' '.join(str(e).split())}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_dir} does not match its config.json (missing tensors {sorted(missing)}, "
            f"unexpected tensors {sorted(unexpected)}): re-run the train stage"
        )
    model.to(device).eval()
    return model, run, vocab_size
