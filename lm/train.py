"""The only training loop. It knows nothing about the family (minGPT's trainer): it needs a model
with ``forward(idx, targets) -> (logits, loss)`` and two `Batches`.

The count bigram goes through the same entry point: it has no trainable parameters, so `fit`
accumulates its counts over one fixed-order pass of the training split instead of taking steps.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lm.batches import Batches
from lm.config import TrainConfig


class Logger(Protocol):
    """What the loop reports to (MLflow in the pipeline, nothing in unit tests)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    curve: list[dict[str, float]] = field(default_factory=list)
    """One row per evaluation: step, train_loss, val_loss, lr, tokens_per_s, elapsed_s."""
    steps: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    """Target tokens seen by the optimizer (or counted, for bigram_counts)."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall-clock seconds of each step this call ran (batch, forward, backward, update; no evaluation)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def pick_device(name: str) -> torch.device:
    """'auto' → cuda, then mps, then cpu; an explicit device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available: use 'auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but MPS is not available: use 'auto' or 'cpu'")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine / step / constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        drops = sum(step >= f * cfg.max_steps for f in cfg.step_at)
        return cfg.lr * cfg.step_gamma**drops
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (nanoGPT: not on biases and norm gains), or SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[cfg.adamw_impl]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **impl)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device, dtype="float32"
) -> float:
    """Mean loss per target token over fixed batches, in eval mode (BatchNorm uses running stats)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, dtype):
            logits, _ = model(x)
        n = int((y != -1).sum())
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum"
        )
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the training state at the step it stopped at was saved first."""


@dataclass
class _Progress:
    """Everything about the loop besides model and optimizer that a resumed run needs to continue
    exactly: the next step, the running train-loss window, the curve so far and the counters."""

    step: int = 0
    running: float = 0.0
    running_n: int = 0
    t_train: float = 0.0
    tokens: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)


class _StopFlag:
    """First SIGINT/SIGTERM: finish the step, save, stop. A second one aborts at once (the last
    saved state is intact either way: states are written atomically)."""

    def __init__(self) -> None:
        self.set, self._old = False, {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Model, optimizer and torch RNG as named tensors (cloned: tied weights must not share storage
    in a safetensors file), plus the optimizer's non-tensor per-parameter state."""
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    scalars: dict[str, dict] = {}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{i}.{k}"] = v.clone()
            else:
                scalars.setdefault(str(i), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    return tensors, scalars


def _restore(state_dir: Path, fingerprint: str, model, optimizer, rng: np.random.Generator) -> _Progress | None:
    """Load a saved training state into model, optimizer and RNGs; None (and the stale state removed)
    when it was written for different params or data."""
    from lm.checkpoint import CheckpointError, load_state

    tensors, meta = load_state(state_dir)
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
        # param_groups come from the current optimizer: the fingerprint guarantees the same config, and
        # the loop sets lr itself every step.
        optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        rng.bit_generator.state = meta["numpy_rng"]
        random.setstate((meta["python_rng"][0], tuple(meta["python_rng"][1]), meta["python_rng"][2]))
        p = meta["progress"]
        return _Progress(**p)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"training state {state_dir} does not match this run ({' '.join(str(e).split())[:300]}): "
            "delete it to train from scratch"
        ) from None


def fit(
    model: torch.nn.Module,
    train: Batches,
    val: Batches,
    cfg: TrainConfig,
    *,
    device: torch.device | None = None,
    logger: Logger | None = None,
    progress: bool = True,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    state_dir: Path | None = None,
    fingerprint: str = "",
) -> FitResult:
    """Train `model` in place and return its curve. Seeds its own batch sampler from `cfg.seed`
    (the caller seeds torch before building the model, so init and batches are both reproducible).

    With `state_dir`, the full training state is saved there every `cfg.checkpoint_interval` steps
    and on SIGINT/SIGTERM, and a state found there (saved with the same `fingerprint`) is resumed:
    the result is bit-identical to an uninterrupted run on the same device. The caller removes the
    state once the final outputs are written.

    Under torch.distributed (torchrun), each step's batch is split between the ranks (and
    `cfg.grad_accum` micro-batches), gradients are averaged by DDP, and each micro-batch's loss is
    weighted by its share of the batch's target tokens, so the update equals the single-process one
    up to floating-point summation order. Every rank returns the same curve; rank 0 saves states.
    """
    logger = logger or NullLogger()
    device = device or pick_device(cfg.device)
    model.to(device)
    result = FitResult()

    if not any(p.requires_grad for p in model.parameters()):
        return _fit_by_counting(model, train, val, cfg, device, logger, result)

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    chunks = world * cfg.grad_accum
    if cfg.batch_size % chunks:
        raise ValueError(
            f"train.batch_size {cfg.batch_size} is not divisible by {world} processes x train.grad_accum "
            f"{cfg.grad_accum}: choose a batch size that is a multiple of {chunks}"
        )

    # A fixed validation subset, drawn once from its own stream so it never depends on training.
    val_rng = np.random.default_rng([cfg.seed, 1])
    val_batches = [val.sample(val_rng, cfg.batch_size) for _ in range(cfg.eval_batches)]
    rng = np.random.default_rng([cfg.seed, 0])
    optimizer = make_optimizer(model, cfg)
    random.seed(cfg.seed)

    prog = _Progress()
    saving = state_dir is not None and cfg.checkpoint_interval > 0
    last_saved: int | None = None
    if state_dir is not None and Path(state_dir).exists():
        resumed = _restore(Path(state_dir), fingerprint, model, optimizer, rng)
        if resumed is not None:
            prog, last_saved = resumed, resumed.step
            if rank == 0:
                print(f"resuming from {state_dir} at step {prog.step}/{cfg.max_steps}", file=sys.stderr)

    def save() -> None:
        nonlocal last_saved
        if rank == 0:
            from lm.checkpoint import save_state

            tensors, scalars = _state_tensors(model, optimizer)
            s = random.getstate()
            meta = {
                "step": prog.step,
                "fingerprint": fingerprint,
                "optim_scalars": scalars,
                "numpy_rng": rng.bit_generator.state,
                "python_rng": [s[0], list(s[1]), s[2]],
                "progress": asdict(prog),
            }
            save_state(Path(state_dir), tensors, meta)
        if world > 1:
            dist.barrier()
        last_saved = prog.step

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None
        )
    fwd = torch.compile(ddp) if cfg.compile else ddp
    model.train()

    bar = tqdm(
        range(prog.step, cfg.max_steps),
        initial=prog.step,
        total=cfg.max_steps,
        desc="train",
        disable=not progress or rank != 0,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    with _StopFlag() as stop:
        for step in bar:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            x, y = train.sample(rng, cfg.batch_size)
            n_total = int((y != -1).sum())
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            # This rank's micro-batches of the (identically sampled) global batch.
            size = cfg.batch_size // chunks
            mine = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)
            for j, c in enumerate(mine):
                xc = x[c * size : (c + 1) * size].to(device, non_blocking=True)
                yc = y[c * size : (c + 1) * size].to(device, non_blocking=True)
                # Gradients are all-reduced once per step, on the last micro-batch.
                with ddp.no_sync() if world > 1 and j < cfg.grad_accum - 1 else nullcontext():
                    with _autocast(device, cfg.dtype):
                        _, loss = fwd(xc, yc)
                    if chunks > 1:
                        # Weighted by its share of the batch's targets (times `world`: DDP averages ranks).
                        loss = loss * (int((yc != -1).sum()) * world / n_total)
                    loss.backward()
                loss_sum += loss.detach() / world
            signals = torch.stack([loss_sum.float(), torch.tensor(float(stop.set), device=device)])
            if world > 1:
                dist.all_reduce(signals)  # the global loss, and whether any rank was asked to stop
            loss_value = float(signals[0])  # syncs the device, so the timing below is honest
            if not math.isfinite(loss_value):
                where = (
                    f"the last good checkpoint is {state_dir} (step {last_saved})"
                    if last_saved is not None
                    else "no checkpoint was saved before it"
                )
                raise DivergedError(
                    f"loss became {loss_value} at step {step} (lr {lr:.3g}); {where}: "
                    "lower train.lr or raise train.warmup_steps"
                )
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            dt = time.perf_counter() - t0
            prog.t_train += dt
            result.step_seconds.append(dt)
            prog.tokens += n_total
            prog.running, prog.running_n = prog.running + loss_value, prog.running_n + 1
            prog.step = step + 1

            if prog.step % cfg.eval_interval == 0 or prog.step == cfg.max_steps:
                row = {
                    "step": prog.step,
                    "train_loss": prog.running / prog.running_n,
                    "val_loss": estimate_loss(model, val_batches, device, cfg.dtype),
                    "lr": lr,
                    "tokens_per_s": prog.tokens / prog.t_train,
                    "elapsed_s": prog.t_train,
                }
                prog.running, prog.running_n = 0.0, 0
                prog.curve.append(row)
                if rank == 0:
                    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=prog.step)
                bar.set_postfix(
                    train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}"
                )
                if on_eval:
                    on_eval(row)
            if prog.step < cfg.max_steps:
                if bool(signals[1]):
                    if state_dir is None:
                        raise Interrupted(
                            f"interrupted at step {prog.step}/{cfg.max_steps} (no state directory to save to)"
                        )
                    save()
                    raise Interrupted(
                        f"interrupted at step {prog.step}/{cfg.max_steps}; the training state is saved "
                        f"in {state_dir}: run the stage again to resume from there"
                    )
                if saving and prog.step % cfg.checkpoint_interval == 0:
                    save()
    model.eval()
    result.curve, result.steps, result.train_seconds, result.tokens = (
        prog.curve,
        cfg.max_steps,
        prog.t_train,
        prog.tokens,
    )
    return result


def _fit_by_counting(
    model, train: Batches, val: Batches, cfg: TrainConfig, device, logger, result: FitResult
) -> FitResult:
    """Fit a count model (bigram_counts) with one pass over the training split in fixed order."""
    t0 = time.perf_counter()
    for x, y in train.iterate(4096):
        model.fit(x.to(device), y.to(device))
        result.tokens += int((y != -1).sum())
    result.train_seconds = time.perf_counter() - t0
    model.eval()
    val_batches = list(val.iterate(cfg.batch_size))
    row = {
        "step": 0,
        "train_loss": estimate_loss(model, list(train.iterate(4096)), device),
        "val_loss": estimate_loss(model, val_batches, device),
        "lr": 0.0,
        "tokens_per_s": result.tokens_per_s,
        "elapsed_s": result.train_seconds,
    }
    result.curve.append(row)
    logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=0)
    return result
