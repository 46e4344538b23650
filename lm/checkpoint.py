"""Checkpoints are safetensors + a JSON config: nothing is ever unpickled.

``<dir>/model.safetensors`` holds the tensors, ``<dir>/config.json`` the run configuration, the
vocabulary size, the parameter count and the weights' sha256, enough to rebuild the model before
loading the tensors. A checkpoint whose tensors do not match its config (shapes, names) or whose
weights file changed after it was written is rejected with the reason.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
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
# Training state: what a killed run needs to continue exactly where its last save left it.
#
# <state_dir>/state.safetensors: the model ("model.*"), the optimizer's per-parameter tensors ("optim.<i>.*")
# and the torch RNGs ("rng.torch", "rng.cuda.<i>"); <state_dir>/state.json: the step, the fingerprint of what
# the state was saved for, the optimizer's non-tensor state, the numpy and python RNG states and the loop's
# progress (running loss, curve so far, counters).

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


def state_dir_for(out: Path) -> Path:
    """Where the run writing `out` keeps its resumable state: a hidden sibling, not a DVC output, so
    DVC neither caches it nor deletes it before re-running the stage (`models/.<run>.resume`)."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def save_training_state(
    state_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    progress: dict,
    fingerprint: str,
) -> None:
    """Write the full training state atomically (a crash leaves the previous one); `progress` is the loop's
    JSON-able state, with its next ``step``."""
    from safetensors.torch import save_file

    from lm.io import atomic_dir

    # Cloned: tied weights must not share storage in a safetensors file.
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    optim_scalars: dict[str, dict] = {}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{i}.{k}"] = v.clone()
            else:
                optim_scalars.setdefault(str(i), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    version, state, gauss = random.getstate()
    meta = {
        "step": progress["step"],
        "fingerprint": fingerprint,
        "optim_scalars": optim_scalars,
        "numpy_rng": rng.bit_generator.state,
        "python_rng": [version, list(state), gauss],
        "progress": progress,
    }
    with atomic_dir(state_dir) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta) + "\n")


def load_training_state(
    state_dir: Path,
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
) -> dict | None:
    """Restore model, optimizer and every RNG from `state_dir` and return the loop's progress; None (and the
    stale state removed) when it was saved for a different `fingerprint`. A damaged state, or one that does
    not fit the model, is a CheckpointError naming it and the fix."""
    tensors, meta = read_training_state(Path(state_dir))
    if meta.get("fingerprint") != fingerprint:
        print(f"note: {state_dir} was saved for other params or data; training from scratch", file=sys.stderr)
        shutil.rmtree(state_dir, ignore_errors=True)
        return None
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        per_param: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                per_param.setdefault(int(i), {})[name] = v
        for i, st in meta.get("optim_scalars", {}).items():
            per_param.setdefault(int(i), {}).update(st)
        # param_groups come from the current optimizer: the fingerprint guarantees the same config, and the loop
        # sets lr itself every step.
        optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        rng.bit_generator.state = meta["numpy_rng"]
        version, state, gauss = meta["python_rng"]
        random.setstate((version, tuple(state), gauss))
        return dict(meta["progress"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"training state {state_dir} does not match this run ({' '.join(str(e).split())[:300]}): "
            "delete it to train from scratch"
        ) from None


def read_training_state(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON of a saved training state; a damaged one is a CheckpointError naming it."""
    from safetensors.torch import load_file

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
