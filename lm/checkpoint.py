"""Checkpoints are safetensors + a JSON config: nothing is ever unpickled.

``<dir>/model.safetensors`` holds the tensors, ``<dir>/config.json`` the run configuration, the
vocabulary size, the parameter count and the weights' sha256, enough to rebuild the model before
loading the tensors. A checkpoint whose tensors do not match its config (shapes, names) or whose
weights file changed after it was written is rejected with the reason.
"""

from __future__ import annotations

import hashlib
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
        "sha256": _sha256(out_dir / WEIGHTS),
    }
    (out_dir / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    if "sha256" in meta and _sha256(weights) != meta["sha256"]:
        raise CheckpointError(
            f"{weights} has changed since it was saved (its sha256 differs from {ckpt_dir / CONFIG}): "
            "re-run the train stage"
        )
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


# ----------------------------------------------------------------------------------------------
# Training state: what a killed run needs to continue exactly where its last checkpoint left it.

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


def state_dir_for(out: Path) -> Path:
    """Where the run writing `out` keeps its resumable state: a hidden sibling, not a DVC output, so
    DVC neither caches it nor deletes it before re-running the stage (`models/.<run>.resume`)."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def save_state(state_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write one training state atomically: tensors (model, optimizer, torch RNG) as safetensors,
    everything else (step, numpy/python RNG, loss history) as JSON; a crash leaves the previous one."""
    from safetensors.torch import save_file

    from lm.io import atomic_dir

    with atomic_dir(state_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta) + "\n")


def load_state(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a training state written by `save_state`; a damaged one is a CheckpointError naming it."""
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    try:
        meta = json.loads((state_dir / STATE_JSON).read_text())
        tensors = load_file(str(state_dir / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(
            f"training state {state_dir} is unreadable ({e}): delete it to train from scratch"
        ) from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"training state {state_dir}/{STATE_JSON} has no step: delete it to train from scratch")
    return tensors, meta
