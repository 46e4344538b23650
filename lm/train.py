"""The only training loop. It knows nothing about the family (minGPT's trainer): it needs a model
with ``forward(idx, targets) -> (logits, loss)`` and two `Batches`.

The count bigram goes through the same entry point: it has no trainable parameters, so `fit`
accumulates its counts over one fixed-order pass of the training split instead of taking steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device, dtype="float32") -> float:
    """Mean loss per target token over fixed batches, in eval mode (BatchNorm uses running stats)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, dtype):
            logits, _ = model(x)
        n = int((y != -1).sum())
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


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
) -> FitResult:
    """Train `model` in place and return its curve. Seeds its own batch sampler from `cfg.seed`
    (the caller seeds torch before building the model, so init and batches are both reproducible)."""
    logger = logger or NullLogger()
    device = device or pick_device(cfg.device)
    model.to(device)
    result = FitResult()

    if not any(p.requires_grad for p in model.parameters()):
        return _fit_by_counting(model, train, val, cfg, device, logger, result)

    # A fixed validation subset, drawn once from its own stream so it never depends on training.
    val_rng = np.random.default_rng([cfg.seed, 1])
    val_batches = [val.sample(val_rng, cfg.batch_size) for _ in range(cfg.eval_batches)]
    rng = np.random.default_rng([cfg.seed, 0])
    optimizer = make_optimizer(model, cfg)
    fwd = torch.compile(model) if cfg.compile else model
    model.train()

    running, running_n, t_train = 0.0, 0, 0.0
    bar = tqdm(range(cfg.max_steps), desc="train", disable=not progress, mininterval=1.0, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        x, y = train.sample(rng, cfg.batch_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, cfg.dtype):
            _, loss = fwd(x, y)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss became {float(loss)} at step {step} (lr {lr:.3g}): lower train.lr or raise warmup")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_value = float(loss.detach())  # syncs the device, so the timing below is honest
        t_train += time.perf_counter() - t0
        result.tokens += int((y != -1).sum())
        running, running_n = running + loss_value, running_n + 1

        last = step == cfg.max_steps - 1
        if (step + 1) % cfg.eval_interval == 0 or last:
            row = {
                "step": step + 1,
                "train_loss": running / running_n,
                "val_loss": estimate_loss(model, val_batches, device, cfg.dtype),
                "lr": lr,
                "tokens_per_s": result.tokens / t_train,
                "elapsed_s": t_train,
            }
            running, running_n = 0.0, 0
            result.curve.append(row)
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if on_eval:
                on_eval(row)
    model.eval()
    result.steps, result.train_seconds = cfg.max_steps, t_train
    return result


def _fit_by_counting(model, train: Batches, val: Batches, cfg: TrainConfig, device, logger, result: FitResult) -> FitResult:
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
