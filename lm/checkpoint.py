"""Checkpoints are safetensors + a JSON config: nothing is ever unpickled.

``<dir>/model.safetensors`` holds the tensors, ``<dir>/config.json`` the run configuration, the
vocabulary size, the parameter count and the weights' sha256, enough to rebuild the model before
loading the tensors. A checkpoint whose tensors do not match its config (shapes, names) or whose
weights file changed after it was written is rejected with the reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
    with _write_errors_as_os_errors():
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
    """Rebuild the model from config.json and load its tensors (strictly); returns (model, run, vocab_size).

    Before any memory is allocated: the weights must have the sha256 config.json records, their header must hold
    the names and shapes the config builds (on the meta device), and the model must fit in memory
    (:mod:`lm.memory`). Every problem is one CheckpointError line naming the first mismatch and the fix."""
    from lm import memory
    from lm.models import build_model

    ckpt_dir = Path(ckpt_dir)
    meta, run, vocab_size = _read_config(ckpt_dir)
    weights = ckpt_dir / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights} not found: run the train stage for this run first")
    if "sha256" not in meta:
        raise CheckpointError(
            f"{ckpt_dir / CONFIG} records no sha256 of {WEIGHTS}, so the weights cannot be checked: re-run the "
            "train stage (it writes both)"
        )
    if _sha256(weights) != meta["sha256"]:
        raise CheckpointError(
            f"{weights} has changed since it was saved (its sha256 differs from {ckpt_dir / CONFIG}): "
            "re-run the train stage"
        )
    params = _check_header(ckpt_dir, run, vocab_size)
    try:
        memory.check(memory.inference_need(params), "loading the checkpoint", "load it on a larger machine")
    except memory.TooBig as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None
    model = build_model(run.model, vocab_size)
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        why = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{weights} is not a readable safetensors file: {why}") from None
    model.to(device).eval()
    return model, run, vocab_size


def _read_config(ckpt_dir: Path) -> tuple[dict, RunConfig, int]:
    try:
        meta = json.loads((ckpt_dir / CONFIG).read_text())
        run = RunConfig.model_validate(meta["run"])
        vocab_size = int(meta["vocab_size"])
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir / CONFIG} not found: run the train stage for this run first") from None
    except (ValueError, KeyError, TypeError) as e:
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{ckpt_dir / CONFIG} is not a valid checkpoint config ({first}): re-run the train stage"
        ) from None
    if vocab_size < 1:
        raise CheckpointError(f"{ckpt_dir / CONFIG}: vocab_size {vocab_size} must be at least 1: re-run train")
    return meta, run, vocab_size


def _check_header(ckpt_dir: Path, run: RunConfig, vocab_size: int) -> int:
    """Compare the names and shapes the config builds (on the meta device) with those stored in the weights'
    header (read alone); return the parameter count. A tied tensor is stored once, under one of its names."""
    from safetensors import safe_open

    from lm.model_size import build_meta

    try:
        with safe_open(str(ckpt_dir / WEIGHTS), "pt") as f:
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{ckpt_dir / WEIGHTS} is not a readable safetensors file: {e}") from None
    groups: dict[int, tuple[list[int], list[str]]] = {}
    for name, t in build_meta(run.model, vocab_size).state_dict(keep_vars=True).items():
        groups.setdefault(id(t), (list(t.shape), []))[1].append(name)
    problems, params = [], 0
    for shape, names in groups.values():
        held = next((stored[n] for n in names if n in stored), None)
        if held is None:
            problems.append(f"{names[0]} {shape} is missing")
            continue
        params += math.prod(held)
        # A tensor built empty is sized by the data it holds (a counted n-gram's table): only its rank must match.
        if held != shape and not (0 in shape and len(held) == len(shape)):
            problems.append(f"{names[0]} is {held} in {WEIGHTS} but {shape} by config.json")
    known = {n for _, names in groups.values() for n in names}
    problems += [f"{WEIGHTS} holds {n}, which config.json does not build" for n in sorted(stored.keys() - known)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{ckpt_dir} does not match its config.json: {problems[0]}{more}: re-run the train stage")
    return params


# ----------------------------------------------------------------------------------------------
# Training state: what a killed run needs to continue exactly where its last save left it.
#
# <state_dir>/state.safetensors: the model ("model.*"), the optimizer's per-parameter tensors ("optim.<i>.*")
# and the torch RNGs ("rng.torch", "rng.cuda.<i>"); <state_dir>/state.json: the step, the fingerprint of what
# the state was saved for (params, training tokens, code), the sha256 of every tensor, the optimizer's
# non-tensor state, the numpy and python RNG states and the loop's progress (running loss, curve, counters).

STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


class StaleState(Exception):
    """A saved training state that must not be resumed; the message says why (one line)."""


def state_dir_for(out: Path) -> Path:
    """Where the run writing `out` keeps its resumable state: a hidden sibling, not a DVC output, so
    DVC neither caches it nor deletes it before re-running the stage (`models/.<run>.resume`)."""
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def lock_path_for(out: Path) -> Path:
    """The lock file of the run writing `out` (`models/.<run>.lock`): one trainer per run at a time."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype, any device)."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def saved_step(state_dir: Path) -> int | None:
    """The step of the training state in `state_dir`, or None when there is none that reads."""
    try:
        return int(json.loads((Path(state_dir) / STATE_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_training_state(
    state_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    progress: dict,
    fingerprint: dict,
    best: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the full training state atomically (a crash leaves the previous one); `progress` is the loop's
    JSON-able state, with its next ``step``; `best` the weights of the best evaluation so far (train.keep
    'best'), saved as ``best.<name>``."""
    from safetensors.torch import save_file

    from lm.atomic import atomic_dir

    # Cloned: tied weights must not share storage in a safetensors file.
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v.detach().clone() for k, v in (best or {}).items()}
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
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    version, state, gauss = random.getstate()
    meta = {
        "step": progress["step"],
        "fingerprint": fingerprint,
        "sha256": {k: tensor_sha256(v) for k, v in tensors.items()},
        "optim_scalars": optim_scalars,
        "numpy_rng": rng.bit_generator.state,
        "python_rng": [version, list(state), gauss],
        "progress": progress,
    }
    with atomic_dir(state_dir) as tmp:
        with _write_errors_as_os_errors():
            save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta) + "\n")


def load_training_state(
    state_dir: Path,
    fingerprint: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, optimizer and every RNG from `state_dir`; return the loop's progress and the saved best
    weights (empty when none were saved).

    Raises StaleState, before anything is restored, when the state cannot be resumed: unreadable, a tensor
    whose bytes do not match the sha256 saved with it, or saved for other params, tokens or code (the message
    names what differs). The caller then trains from scratch.
    """
    tensors, meta = read_training_state(Path(state_dir))
    _check_fingerprint(meta.get("fingerprint"), fingerprint)
    saved = meta.get("sha256")
    if not isinstance(saved, dict) or set(saved) != set(tensors):
        raise StaleState("it has no sha256 for every tensor (saved by an older version)")
    if bad := [k for k, t in tensors.items() if tensor_sha256(t) != saved[k]]:
        raise StaleState(
            f"it is damaged: tensor {bad[0]!r} does not match its sha256"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    expected = {k: v.shape for k, v in model.state_dict().items()}
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    if {k[6:]: v.shape for k, v in tensors.items() if k.startswith("model.")} != expected or (
        best and {k: v.shape for k, v in best.items()} != expected
    ):
        raise StaleState("its model tensors do not fit this model")
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
        return dict(meta["progress"]), best
    except (KeyError, RuntimeError, ValueError, TypeError) as e:  # the model may be half-restored: stop here
        raise CheckpointError(
            f"training state {state_dir} passed its checks but does not load ({' '.join(str(e).split())[:300]}): "
            "delete it to train from scratch"
        ) from None


def _check_fingerprint(saved: object, current: dict) -> None:
    if not isinstance(saved, dict):
        raise StaleState("it was saved by an older version (no code fingerprint)")
    if saved.get("config") != current["config"]:
        raise StaleState("it was saved for other params")
    if saved.get("tokens") != current["tokens"]:
        raise StaleState("it was saved for other training tokens")
    old, new = saved.get("code", {}), current["code"]
    if changed := sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f)):
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise StaleState(f"it was saved by other code ({', '.join(changed[:3])}{more} changed since)")


def read_training_state(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON of a saved training state; StaleState if it is unreadable."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((state_dir / STATE_JSON).read_text())
        tensors = load_file(str(state_dir / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise StaleState(f"it is unreadable ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise StaleState(f"its {STATE_JSON} has no step")
    return tensors, meta


@contextmanager
def _write_errors_as_os_errors() -> Iterator[None]:
    """safetensors reports a failed write as a SafetensorError ('... IoError(Os { code: 28, kind: StorageFull
    ...'), not an OSError: turn it into the OSError it is, so callers report it as any failed write (path, fix)."""
    try:
        yield
    except SafetensorError as e:
        code = re.search(r"code: (\d+)", str(e))
        raise OSError(int(code[1]) if code else errno.EIO, os.strerror(int(code[1])) if code else str(e)) from e
