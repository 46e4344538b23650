"""The only training loop (minGPT's trainer). It knows nothing about the family: it needs a model with
``forward(idx, targets) -> (logits, loss)`` and two `Batches`.

A counting family (``model.cfg.fitting == 'counting'``, the count bigram) goes through the same entry point:
`fit` accumulates its counts over one fixed-order pass of the training split instead of taking steps.

`fit` reads like nanoGPT's loop: one step (`_Loop.step`: set the lr, compute the gradient of a batch, check the
loss, update), evaluate every ``eval_interval`` steps, save every ``checkpoint_interval``. Data parallelism
(`_Replica`), resuming and saving (`_Saver`) and Ctrl-C (`_StopFlag`) are small helpers below it.
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lm import checkpoint, distributed, muon
from lm.batches import Batches
from lm.config import TrainConfig, Warmup
from lm.distributed import pick_device
from lm.health import HealthRecorder
from lm.metrics import accuracy, autocast, score
from lm.models import IGNORE_INDEX

SELECT = ("val_loss", "val_accuracy")
"""What train.keep 'best' can rank evaluations by (`fit`'s `select`)."""


class Logger(Protocol):
    """What the loop reports to (the stage's MLflow run in the pipeline)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the training state at the step it stopped at was saved first."""


@dataclass
class FitResult:
    curve: list[dict[str, float]] = field(default_factory=list)
    """One row per evaluation: step, tokens, train_loss, val_loss, lr (numbers a rerun reproduces exactly)."""
    steps: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    """Target tokens seen by the optimizer (or counted, for a counting family)."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall-clock seconds of each step this call ran (batch, forward, backward, update; no evaluation)."""
    selected_step: int = 0
    """The step whose weights the model holds on return: the best evaluation's (train.keep 'best') or the last."""
    health: list[dict] = field(default_factory=list)
    """Training-health records (train.health_every; lm.inspection.HealthRecorder), one per recorded step."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine / step / constant. Under train.time_budget_s
    the decay follows `elapsed` (seconds of training before this step) as a share of the budget instead of the
    step as a share of max_steps: a schedule over time, so the run is annealed when its time is up."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    budget = cfg.time_budget_s
    if cfg.schedule == "step":
        drops = sum((elapsed >= f * budget) if budget else (step >= f * cfg.max_steps) for f in cfg.step_at)
        return cfg.lr * cfg.step_gamma**drops
    if budget:
        progress = elapsed / budget  # the warmup's seconds count: the budget is the whole run's
    else:
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def ramp(warmup: Warmup | None, full: int, step: int, multiple: int = 1) -> int:
    """The value of a batch-size or window-length warm-up at `step` (0-based): linear from ``warmup.start`` to
    `full` over ``warmup.steps`` steps, rounded down to a multiple of `multiple` (never below the start rounded down
    alike, nor below `multiple`); `full` without a warm-up or once it is over."""
    if warmup is None or step >= warmup.steps:
        return full
    value = int(warmup.start + (full - warmup.start) * step / warmup.steps)
    return min(full, max(warmup.start // multiple * multiple, value // multiple * multiple, multiple))


def compiles(cfg: TrainConfig, device: torch.device | str) -> bool:
    """Whether `fit` wraps the model in torch.compile: train.compile, with 'auto' meaning CUDA only."""
    return torch.device(device).type == "cuda" if cfg.compile == "auto" else cfg.compile


def adamw_impl(cfg: TrainConfig, device: torch.device | str) -> str:
    """The AdamW kernel `make_optimizer` uses: train.adamw_impl, with 'auto' meaning fused on CUDA, else foreach."""
    if cfg.adamw_impl == "auto":
        return "fused" if torch.device(device).type == "cuda" else "foreach"
    return cfg.adamw_impl


def use_device(cfg: TrainConfig, device: torch.device | str) -> None:
    """Process-wide settings for training on `device`: TF32 matmuls on CUDA when train.tf32 (nanoGPT)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device | str = "cpu"
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (nanoGPT: not on biases and norm gains), SGD, or Muon on the hidden
    matrices with AdamW on the rest (lm/muon.py)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = muon.hidden_matrices(model) if cfg.optimizer == "muon" else set()
    if cfg.optimizer == "muon" and not hidden:
        raise ValueError(
            f"train.optimizer 'muon' trains attention and feed-forward matrices, and {type(model).__name__} has "
            "none: use 'adamw'"
        )
    decay = [p for n, p in named if p.dim() >= 2 and n not in hidden]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1)
    kernels = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}
    impl = kernels[adamw_impl(cfg, device)]
    if cfg.optimizer == "muon":
        scale = (cfg.muon_lr or muon.MUON_LR) / cfg.lr
        matrices = {"params": [p for n, p in named if n in hidden], "weight_decay": cfg.weight_decay}
        groups = [matrices | {"muon": True, "lr_scale": scale}, *groups]
        return muon.MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=impl.get("foreach"))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **impl)


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
    fingerprint: dict | None = None,
    select: str = "val_loss",
) -> FitResult:
    """Train `model` in place and return its curve. Seeds its own batch sampler from `cfg.seed` (the caller
    seeds torch before building the model, so init and batches are both reproducible).

    With `state_dir`, the full training state is saved there every `cfg.checkpoint_interval` steps, on
    SIGINT/SIGTERM and after the last step, and a state found there (saved with the same `fingerprint`:
    params, tokens and code, see lm.train_run.fingerprint) is resumed: the result is bit-identical to an
    uninterrupted run on the same device. The caller removes the state once the final outputs are written.

    `on_eval` is called with each curve row, plus the wall-clock figures (``elapsed_s``: seconds of training steps so
    far, evaluations excluded; ``tokens_per_s``).

    `select` is what train.keep 'best' ranks evaluations by: 'val_loss' (lowest), or 'val_accuracy' (highest, the
    argmax prediction against the target; ties go to the lower val loss), which adds val_accuracy to every curve row.
    The val subset is `val.eval_subset` (a language model's: eval_batches random batches drawn once; a classifier's
    examples: the whole split).

    Under torch.distributed (torchrun) every rank trains on its share of each batch (see `_Replica`) and
    returns the same curve; rank 0 alone saves states and logs.
    """
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    device = device or pick_device(cfg.device)
    use_device(cfg, device)
    model.to(device)
    if model.cfg.fitting == "counting":
        return _fit_by_counting(model, train, val, cfg, device, logger)

    _check_windows(cfg, train)
    loop = _Loop.start(model, val, cfg, device, logger, state_dir, fingerprint, select)
    with _StopFlag() as stop, _progress_bar(loop.prog.step, cfg, enabled=progress and loop.replica.rank == 0) as bar:
        for step in range(loop.prog.step, cfg.max_steps):
            lr, stop_asked = loop.step(step, train, stop.set)
            bar.update()
            last = loop.prog.step == cfg.max_steps or loop.out_of_time()
            if loop.prog.step % cfg.eval_interval == 0 or last:
                row = loop.evaluate(lr)
                bar.set_postfix(
                    train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}", tok_s=f"{loop.prog.tok_s:.0f}"
                )
                if on_eval:
                    on_eval(row | loop.prog.timing())
            if last:
                break
            loop.save(interrupted=stop_asked)
    return loop.finish()


def _check_windows(cfg: TrainConfig, train: Batches) -> None:
    """train.seq_warmup shortens text windows, which only an attention model's batches are (fixed-context families
    mask each window's first targets; names and labelled examples have no windows)."""
    if cfg.seq_warmup is not None and not (isinstance(train, Batches) and train.fmt == "text" and not train.overlap):
        raise ValueError(
            "train.seq_warmup grows the text windows an attention model trains on; this run's batches have none "
            "(a names or labelled corpus, or a fixed-context family): remove seq_warmup"
        )


@dataclass
class _Loop:
    """A gradient-fitted run's moving parts between steps: the model and its replica, the optimizer, the batch RNG,
    the fixed val subset, the progress (what a resumed run continues from), the saver and the health recorder."""

    model: torch.nn.Module
    cfg: TrainConfig
    device: torch.device
    logger: Logger | None
    replica: _Replica
    val_batches: list
    rng: np.random.Generator
    optimizer: torch.optim.Optimizer
    saver: _Saver
    prog: _Progress
    health: HealthRecorder | None
    step_seconds: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, model, val: Batches, cfg: TrainConfig, device, logger, state_dir, fingerprint, select) -> _Loop:
        """Everything seeded from `cfg.seed`, in a fixed order; resumed from `state_dir` where a state matches."""
        replica = _Replica.join(model, device, cfg)
        # A fixed validation subset, drawn once from its own stream so it never depends on training.
        val_rng = np.random.default_rng([cfg.seed, 1])
        val_batches = val.eval_subset(val_rng, cfg.batch_size, cfg.eval_batches)
        rng = np.random.default_rng([cfg.seed, 0])
        optimizer = make_optimizer(model, cfg, device)
        random.seed(cfg.seed)
        saver = _Saver(state_dir, fingerprint, cfg, replica, select)
        prog = saver.resume(model, optimizer, rng)
        replica.wrap(cfg, compiles(cfg, device))
        health = HealthRecorder(records=prog.health) if cfg.health_every else None
        if prog.step == 0 and logger and replica.rank == 0:  # where the curve starts: ≈ ln V
            total, count = score(model, val_batches, device, cfg.dtype)
            logger.log_metrics({"tokens": 0, "val_loss": total / max(count, 1)}, step=0)
        model.train()
        return cls(model, cfg, device, logger, replica, val_batches, rng, optimizer, saver, prog, health)

    def step(self, step: int, train: Batches, stop: bool) -> tuple[float, bool]:
        """One optimizer step (`step` is 0-based): set the lr, compute the gradient of a batch, check the loss,
        clip, update. Returns the lr and whether a stop was asked (on any rank)."""
        cfg, model = self.cfg, self.model
        lr = lr_at(step, cfg, self.prog.t_train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        x, y = self.sample(step, train)
        self.optimizer.zero_grad(set_to_none=True)
        watch = self.health is not None and _health_due(step + 1, cfg)
        if watch:
            self.health.arm(model)  # its hooks see this step's forward pass
        loss, stop_asked = self.replica.backward(x, y, cfg, stop)
        if not math.isfinite(loss):
            raise DivergedError(
                f"loss became {loss} at step {step} (lr {lr:.3g}); {self.saver.last_good()}: "
                "lower train.lr or raise train.warmup_steps"
            )
        if watch:
            self.health.after_backward(model)  # the raw gradients, before clipping
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if watch:
            rec = self.health.after_update(model, step + 1, histograms=step + 1 in (1, cfg.max_steps))
            self._log({f"ud/{k}": v for k, v in rec["update_ratio"].items()}, step + 1)
        self.step_seconds.append(time.perf_counter() - t0)
        self.prog.record(loss, int((y != IGNORE_INDEX).sum()), self.step_seconds[-1])
        return lr, stop_asked

    def sample(self, step: int, train: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step`: batch_size windows, fewer or shorter under a batch-size or window-length warm-up."""
        cfg = self.cfg
        size = ramp(cfg.batch_warmup, cfg.batch_size, step, self.replica.world * self.replica.accum)
        if cfg.seq_warmup is None:
            return train.sample(self.rng, size)
        return train.sample(self.rng, size, length=ramp(cfg.seq_warmup, train.seq_len, step))

    def out_of_time(self) -> bool:
        """Whether train.time_budget_s seconds of training steps have been spent."""
        return self.cfg.time_budget_s is not None and self.prog.t_train >= self.cfg.time_budget_s

    def evaluate(self, lr: float) -> dict[str, float]:
        """A curve row on the fixed val subset (keeping the best weights under train.keep 'best'), logged."""
        row = self.prog.evaluate(self.model, self.val_batches, self.device, self.cfg.dtype, lr)
        self._log({k: v for k, v in row.items() if k != "step"} | self.prog.timing(), self.prog.step)
        return row

    def save(self, *, interrupted: bool) -> None:
        """The training state, when a stop was asked (then exit) or every checkpoint_interval steps."""
        args = (self.model, self.optimizer, self.rng, self.prog)
        if interrupted:
            self.saver.interrupt(*args)
        elif self.saver.due(self.prog.step):
            self.saver.save(*args)

    def finish(self) -> FitResult:
        """Save the final state (kept until the caller has written the outputs), load the selected weights."""
        self.saver.save_final(self.model, self.optimizer, self.rng, self.prog)
        self.prog.restore_selected(self.model)
        self.model.eval()
        p = self.prog
        return FitResult(p.curve, p.step, p.t_train, p.tokens, self.step_seconds, p.selected_step, p.health)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger and self.replica.rank == 0:
            self.logger.log_metrics(metrics, step=step)


def _health_due(step: int, cfg: TrainConfig) -> bool:
    """Whether training health is recorded after `step` (1-based): the first, every health_every-th, the last."""
    return step == 1 or step % cfg.health_every == 0 or step == cfg.max_steps


# ----------------------------------------------------------------------------------------------
# the loop's state and helpers


@dataclass
class _Progress:
    """Everything besides model, optimizer and RNGs that a resumed run needs to continue exactly: the next
    step, the running train-loss window, the curve so far, the counters, and (train.keep 'best') the step and
    weights of the best evaluation so far (the weights are saved as tensors beside the rest, see `_Saver`)."""

    step: int = 0
    running: float = 0.0
    running_n: int = 0
    t_train: float = 0.0
    tokens: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    keep: str = "last"
    select: str = "val_loss"
    health: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def state(self) -> dict:
        """The JSON-able part (everything but the best weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "best"}

    def record(self, loss: float, tokens: int, seconds: float) -> None:
        """One optimizer step done."""
        self.step += 1
        self.running, self.running_n = self.running + loss, self.running_n + 1
        self.tokens += tokens
        self.t_train += seconds

    def evaluate(self, model: torch.nn.Module, val_batches: list, device, dtype: str, lr: float) -> dict[str, float]:
        """A curve row: the mean train loss since the last row and the loss on the fixed val subset."""
        total, count = score(model, val_batches, device, dtype)
        row = {
            "step": self.step,
            "tokens": self.tokens,
            "train_loss": self.running / self.running_n,
            "val_loss": total / max(count, 1),
            "lr": lr,
        }
        if self.select == "val_accuracy":
            correct, n = accuracy(model, val_batches, device, dtype)
            row["val_accuracy"] = correct / max(n, 1)
        self.running, self.running_n = 0.0, 0
        if self.keep == "best" and (self.best_step is None or self._rank(row) < self._rank(self.best_row)):
            # A copy on the model's device (fast); strictly better, so a tie keeps the earlier step.
            self.best_step = self.step
            self.best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.curve.append(row)
        return row

    def _rank(self, row: dict[str, float]) -> tuple[float, ...]:
        """Lower is better: val loss, or (select 'val_accuracy') minus accuracy, then val loss."""
        if self.select == "val_accuracy":
            return (-row["val_accuracy"], row["val_loss"])
        return (row["val_loss"],)

    @property
    def best_row(self) -> dict[str, float]:
        return next(r for r in self.curve if r["step"] == self.best_step)

    @property
    def selected_step(self) -> int:
        return self.best_step if self.keep == "best" and self.best_step is not None else self.step

    def restore_selected(self, model: torch.nn.Module) -> None:
        """Load the best evaluation's weights into `model` (train.keep 'best'; the last step's are there already)."""
        if self.keep == "best" and self.best is not None and self.best_step != self.step:
            model.load_state_dict(self.best)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.t_train if self.t_train else 0.0

    def timing(self) -> dict[str, float]:
        """Wall-clock figures: logged, never part of the curve (a rerun does not reproduce them)."""
        return {"tokens_per_s": self.tok_s, "elapsed_s": self.t_train}


@dataclass
class _Replica:
    """This process's part in (possibly data-parallel) training.

    Every rank samples the same global batch (same seed) and trains on its slice: the batch is cut into
    ``world x grad_accum`` micro-batches, each weighted by its share of the batch's target tokens, so the
    update equals the single-process one up to floating-point summation order. DDP averages the gradients
    once per step (on the last micro-batch)."""

    model: torch.nn.Module
    device: torch.device
    rank: int = 0
    world: int = 1
    accum: int = 1
    ddp: torch.nn.Module | None = None
    forward: Callable | None = None

    @classmethod
    def join(cls, model: torch.nn.Module, device: torch.device, cfg: TrainConfig) -> _Replica:
        rank, world = distributed.rank(), distributed.world_size()
        chunks = world * cfg.grad_accum
        if world > 1 and cfg.time_budget_s is not None:
            # Each process's clock would set its own lr and its own last step: the replicas would part.
            raise ValueError(
                f"train.time_budget_s schedules over one process's clock; under torchrun ({world} processes) use "
                "max_steps instead"
            )
        if cfg.batch_size % chunks:
            raise ValueError(
                f"train.batch_size {cfg.batch_size} is not divisible by {world} processes x train.grad_accum "
                f"{cfg.grad_accum}: choose a batch size that is a multiple of {chunks}"
            )
        return cls(model, device, rank, world, cfg.grad_accum)

    def wrap(self, cfg: TrainConfig, compile: bool) -> None:
        """DDP across processes, then torch.compile if `compile` (after a resume has loaded the weights)."""
        self.ddp = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        if compile:
            import torch._inductor.config as inductor_config

            # Inductor's generated kernels follow the deterministic-algorithms setting only through its own flag.
            inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
        self.forward = torch.compile(self.ddp) if compile else self.ddp

    def backward(self, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, stop: bool) -> tuple[float, bool]:
        """Accumulate the gradient of the global batch (x, y); return its mean loss and whether any rank was
        asked to stop. Reading the loss syncs the device, so the caller's step timing is honest."""
        n_total = int((y != IGNORE_INDEX).sum())
        chunks = self.world * self.accum
        size = len(x) // chunks  # x may be smaller than batch_size under train.batch_warmup
        loss_sum = torch.zeros((), device=self.device)
        for j, c in enumerate(range(self.rank * self.accum, (self.rank + 1) * self.accum)):
            xc = x[c * size : (c + 1) * size].to(self.device, non_blocking=True)
            yc = y[c * size : (c + 1) * size].to(self.device, non_blocking=True)
            last = j == self.accum - 1
            with self.ddp.no_sync() if self.world > 1 and not last else nullcontext():
                with autocast(self.device, cfg.dtype):
                    _, loss = self.forward(xc, yc)
                if chunks > 1:
                    # Weighted by its share of the batch's targets (times `world`: DDP averages the ranks).
                    loss = loss * (int((yc != IGNORE_INDEX).sum()) * self.world / n_total)
                loss.backward()
            loss_sum += loss.detach() / self.world
        signals = torch.stack([loss_sum.float(), torch.tensor(float(stop), device=self.device)])
        if self.world > 1:
            dist.all_reduce(signals)  # the global loss, and whether any rank was asked to stop
        return float(signals[0]), bool(signals[1])


class _Saver:
    """Resuming from and saving to the training state directory (rank 0 writes; every rank waits)."""

    def __init__(
        self, state_dir: Path | None, fingerprint: dict | None, cfg: TrainConfig, replica: _Replica, select: str
    ):
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.select = select
        self.fingerprint = fingerprint or {"config": "", "tokens": "", "code": {}}
        self.cfg, self.replica = cfg, replica
        self.last_saved: int | None = None

    def resume(self, model, optimizer, rng: np.random.Generator) -> _Progress:
        """The saved progress if a resumable state exists (model, optimizer, RNGs restored); otherwise a fresh
        start, with one line saying why a state that exists is not resumed (it is removed)."""
        if self.state_dir is None or not self.state_dir.exists():
            return _Progress(keep=self.cfg.keep, select=self.select)
        try:
            saved, best = checkpoint.load_training_state(self.state_dir, self.fingerprint, model, optimizer, rng)
        except checkpoint.StaleState as why:
            if self.replica.rank == 0:
                print(f"note: not resuming from {self.state_dir}: {why}; training from scratch", file=sys.stderr)
                shutil.rmtree(self.state_dir, ignore_errors=True)
            return _Progress(keep=self.cfg.keep, select=self.select)
        best = {k: v.to(self.replica.device) for k, v in best.items()} or None
        prog = _Progress(**(saved | {"keep": self.cfg.keep, "select": self.select}), best=best)
        self.last_saved = prog.step
        if self.replica.rank == 0:
            print(f"resuming from {self.state_dir} at step {prog.step}/{self.cfg.max_steps}", file=sys.stderr)
        return prog

    def due(self, step: int) -> bool:
        return (
            self.state_dir is not None and self.cfg.checkpoint_interval > 0 and step % self.cfg.checkpoint_interval == 0
        )

    def save(self, model, optimizer, rng: np.random.Generator, prog: _Progress, *, must: bool = False) -> None:
        """Save the state. A failed write (a full disk) is a warning and training goes on, unless `must` (an
        interrupt: the state is all the user will have), when it raises OutputError naming the path and fix."""
        try:
            if self.replica.rank == 0:
                checkpoint.save_training_state(
                    self.state_dir, model, optimizer, rng, prog.state(), self.fingerprint, best=prog.best
                )
        except OSError as e:
            if must:
                raise
            since = f"step {self.last_saved}" if self.last_saved is not None else "scratch"
            print(f"warning: {e}; training goes on, but a crash now restarts from {since}", file=sys.stderr)
            return
        finally:
            if self.replica.world > 1:
                dist.barrier()
        self.last_saved = prog.step

    def save_final(self, model, optimizer, rng: np.random.Generator, prog: _Progress) -> None:
        """The state after the last step, so that outputs that fail to be written (a full disk) are not lost:
        a re-run resumes at the end and only writes them."""
        if self.state_dir is not None and self.last_saved != prog.step:
            self.save(model, optimizer, rng, prog)

    def interrupt(self, model, optimizer, rng: np.random.Generator, prog: _Progress) -> None:
        """Save (where there is a state directory) and raise Interrupted naming where to resume from."""
        where = f"{prog.step}/{self.cfg.max_steps}"
        if self.state_dir is None:
            raise Interrupted(f"interrupted at step {where} (no state directory to save to)")
        self.save(model, optimizer, rng, prog, must=True)
        raise Interrupted(
            f"interrupted at step {where}; the training state is saved in {self.state_dir}: "
            "run the stage again to resume from there"
        )

    def last_good(self) -> str:
        if self.last_saved is None:
            return "no checkpoint was saved before it"
        return f"the last good checkpoint is {self.state_dir} (step {self.last_saved})"


class _StopFlag:
    """First SIGINT/SIGTERM: finish the step, save, stop. A second one aborts at once (the last saved state is
    intact either way: states are written atomically)."""

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


def _progress_bar(start: int, cfg: TrainConfig, enabled: bool) -> tqdm:
    return tqdm(
        initial=start, total=cfg.max_steps, desc="train", disable=not enabled, mininterval=1.0, dynamic_ncols=True
    )


COUNTED_TRAIN_STRIDE = 4
"""A counted run's train loss scores every 4th batch of the train split's fixed order (a quarter of it: an estimate,
as every run's train loss is), since scoring all of it costs more than counting a Kneser-Ney model. Its val loss is
the whole split, as evaluate's."""


def _fit_by_counting(model, train: Batches, val: Batches, cfg: TrainConfig, device, logger) -> FitResult:
    """Fit a counting family with one pass over the training split in fixed order."""
    result = FitResult()
    t0 = time.perf_counter()
    for x, y in train.iterate(4096):
        model.accumulate(x.to(device), y.to(device))
        result.tokens += int((y != IGNORE_INDEX).sum())
    result.train_seconds = time.perf_counter() - t0
    model.eval()
    row = {
        "step": 0,
        "tokens": result.tokens,
        "train_loss": _mean_loss(model, itertools.islice(train.iterate(1024), 0, None, COUNTED_TRAIN_STRIDE), device),
        "val_loss": _mean_loss(model, val.iterate(cfg.batch_size), device),
        "lr": 0.0,
    }
    result.curve.append(row)
    if logger:
        timing = {"tokens_per_s": result.tokens_per_s, "elapsed_s": result.train_seconds}
        logger.log_metrics({k: v for k, v in row.items() if k != "step"} | timing, step=0)
    return result


def _mean_loss(model, batches: Iterator, device) -> float:
    total, count = score(model, batches, device)
    return total / max(count, 1)
