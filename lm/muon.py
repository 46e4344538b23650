"""Muon for the hidden matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024) replaces each hidden weight
matrix's momentum update by its nearest semi-orthogonal matrix, computed with a few Newton–Schulz iterations:
every direction of the update moves by about the same amount, where Adam's update is dominated by a few. Muon is
meant for the matrices inside the network only; the embeddings, the output head, the norm gains and the biases keep
AdamW (as the post prescribes). Which parameters are hidden is the family's own declaration
(:attr:`lm.models.base.LanguageModel.components`): the matrices of 'attention' and 'feed_forward'.

torch.optim.Muon (torch >= 2.9) casts to bf16 for the Newton–Schulz iterations, which on a CPU without native
bf16 matmuls is two orders of magnitude slower than fp32 (docs/performance.md). Here they run in ``ns_dtype``,
fp32 by default: the update is then the same on every machine, and with ``ns_dtype=torch.bfloat16`` it is
torch.optim.Muon's step exactly (tests/test_muon.py). The AdamW groups are torch's own functional AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic Newton–Schulz coefficients of the Muon post (and torch.optim.Muon): chosen to maximise the slope at
zero, so five steps push every singular value into roughly [0.7, 1.2] rather than exactly to 1."""
NS_STEPS = 5
MUON_LR = 0.02
"""train.muon_lr's default: the Muon post's learning rate for its GPT-2 speedrun."""
EPS = 1e-7
HIDDEN = ("attention", "feed_forward")
"""The components (lm.models.base.COMPONENTS) whose matrices Muon trains."""


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """About U·Vᵀ of g = U·S·Vᵀ (its singular values pushed towards 1) by `steps` quintic Newton–Schulz
    iterations in `dtype`; the result has g's shape and dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # iterate on the wide side: the Gram matrix x @ x.T is the smaller square
    x = x / x.norm().clamp(min=EPS)  # Frobenius norm >= spectral norm, so every singular value is <= 1
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m = min(g.shape)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    return (x.T if tall else x).to(g.dtype)


def hidden_matrices(model: nn.Module) -> set[str]:
    """Names of the parameters Muon trains: the 2-D ones of the 'attention' and 'feed_forward' components, as the
    model's family declares them (a tied embedding/head matrix is an embedding, so it stays with AdamW)."""
    component_of = type(model).component_of
    return {n for n, p in model.named_parameters() if p.ndim == 2 and component_of(n) in HIDDEN}


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups with ``muon=True``, AdamW (decoupled weight decay) on the others.

    The training loop sets every group's ``lr`` from one schedule; a Muon group's step multiplies it by the group's
    ``lr_scale`` (train.muon_lr / train.lr), so both follow the same warmup and cosine. Muon's step size is further
    scaled by sqrt(max(1, rows/cols)) (the post's and torch's 'original' adjustment). Muon groups use Nesterov
    momentum in torch's form (an exponential average; the Newton–Schulz normalisation makes the scale moot).
    """

    def __init__(
        self,
        groups: Iterable[dict],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        ns_dtype: torch.dtype = torch.float32,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False, lr_scale=1.0)
        super().__init__(list(groups), defaults)
        self.ns_dtype, self.foreach = ns_dtype, foreach
        for group in self.param_groups:
            if group["muon"] and (bad := [tuple(p.shape) for p in group["params"] if p.ndim != 2]):
                raise ValueError(f"Muon trains matrices only; this group has parameters of shape {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, m = group["lr"] * group["lr_scale"], group["momentum"]
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - m)
            update = orthogonalize(p.grad.lerp(buf, m), dtype=self.ns_dtype)  # Nesterov: look one step ahead
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:
                self.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=self.foreach,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
