"""Training health as makemore part 4 diagnoses a net: activation and gradient histograms and the
update-to-data ratio, recorded by `lm.trainer.fit` (train.health_every) through forward hooks on the activation
modules (the models compute tanh, GELU and SiLU as modules for this). The report draws them (lm/report.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

HIST_BINS = 40
SATURATED = 0.97
"""|tanh| above this counts as saturated (makemore part 4): its gradient (1 - t²) is below 0.06."""


def histogram(x: torch.Tensor, bins: int = HIST_BINS, limit: float | None = None) -> dict:
    """Counts of `x` in `bins` equal bins over [-limit, limit] (default: its largest magnitude), with its mean and
    std: what a histogram figure needs, small enough for JSON. The counts add up to x.numel()."""
    x = x.detach().float().flatten().cpu()
    limit = limit or float(x.abs().max()) or 1.0
    counts = torch.histc(x.clamp(-limit, limit), bins=bins, min=-limit, max=limit)
    return {"limit": limit, "counts": [int(c) for c in counts.tolist()], "mean": float(x.mean()), "std": float(x.std())}


@dataclass
class HealthRecorder:
    """Training health of one model, recorded at chosen steps (`lm.trainer.fit` with train.health_every):

    * activation histograms of every ``nn.Tanh`` (with the saturated fraction) and ``nn.GELU`` / ``nn.SiLU`` output;
    * gradient histograms of every 2-D weight;
    * the log10 update-to-data ratio per 2-D weight, std(Δw) / std(w) of the optimizer's actual update.

    Use: ``arm(model)`` before the step's forward, ``after_backward(model)`` once gradients exist,
    ``after_update(model, step, histograms)`` after the optimizer step; the result is one JSON-able record.
    """

    records: list[dict] = field(default_factory=list)
    _acts: dict = field(default_factory=dict, repr=False)
    _hooks: list = field(default_factory=list, repr=False)
    _before: dict = field(default_factory=dict, repr=False)
    _grads: dict = field(default_factory=dict, repr=False)

    ACTIVATIONS = (nn.Tanh, nn.GELU, nn.SiLU)

    def arm(self, model: nn.Module) -> None:
        self._acts = {}
        for name, mod in model.named_modules():
            if isinstance(mod, self.ACTIVATIONS):
                self._hooks.append(mod.register_forward_hook(self._keep(name, isinstance(mod, nn.Tanh))))
        self._before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}

    def _keep(self, name: str, tanh: bool):
        def hook(module, inputs, output):
            self._acts[name] = (output.detach(), tanh)

        return hook

    def after_backward(self, model: nn.Module) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._grads = {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if n in self._before and p.grad is not None
        }

    def after_update(self, model: nn.Module, step: int, histograms: bool) -> dict:
        ratios = {}
        for n, p in model.named_parameters():
            if n in self._before:
                delta = (p.detach() - self._before[n]).float().std()
                ratios[n] = math.log10(max(float(delta / (self._before[n].float().std() + 1e-12)), 1e-12))
        record: dict = {"step": step, "update_ratio": ratios}
        if histograms:
            record["activations"] = {
                n: histogram(a, limit=1.0 if tanh else None)
                | ({"saturated": float((a.abs() > SATURATED).float().mean())} if tanh else {})
                for n, (a, tanh) in self._acts.items()
            }
            record["gradients"] = {n: histogram(g) for n, g in self._grads.items()}
        self._acts, self._before, self._grads = {}, {}, {}
        self.records.append(record)
        return record
