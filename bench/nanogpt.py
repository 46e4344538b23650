"""The reference for the GPU check: nanoGPT's ``train.py config/train_shakespeare_char.py``, written plainly.

Karpathy's nanoGPT (github.com/karpathy/nanoGPT, model.py and train.py) with its Shakespeare-char config: 6 layers,
6 heads, n_embd 384, block 256, batch 64, dropout 0.2, no biases, tied embeddings, AdamW (lr 1e-3, betas 0.9/0.99,
weight decay 0.1 on 2-D weights, fused on CUDA), 100 warmup steps, cosine to 1e-4 at 5000, grad clip 1.0, bf16
autocast and torch.compile on CUDA, an estimate on 200 random batches every 250 steps and the best estimate's
weights kept (``always_save_checkpoint = False``). No code of the study's models or loop is used, so the
comparison checks the study against an independent implementation. It reads the study's tokenized split files
(the same characters and ids as nanoGPT's prepare.py: sorted unique characters, 90/10 split).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False
    batch_size: int = 64
    max_iters: int = 5000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 200
    seed: int = 1337


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1; nanoGPT keeps its own)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class SelfAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.n_head, self.dropout = c.n_head, c.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), SelfAttention(c)
        self.ln_2 = LayerNorm(c.n_embd, c.bias)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias),
            nn.GELU(),
            nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias),
            nn.Dropout(c.dropout),
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("mlp.2.weight") or name.endswith("c_proj.weight"):  # GPT-2's scaled residual init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def num_params(model: nn.Module) -> int:
    """nanoGPT's count: every parameter but the position embedding (the tied table counts once)."""
    return sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()


def get_batch(data: torch.Tensor, c: Config, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: batch_size random windows (torch.randint), pinned on their way to a GPU."""
    ix = torch.randint(len(data) - c.block_size, (c.batch_size,))
    x = torch.stack([data[i : i + c.block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + c.block_size] for i in ix])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it: int, c: Config) -> float:
    """nanoGPT's get_lr: linear warmup, then cosine decay to min_lr."""
    if it < c.warmup_iters:
        return c.lr * (it + 1) / (c.warmup_iters + 1)
    ratio = (it - c.warmup_iters) / (c.max_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (c.lr - c.min_lr)


@torch.no_grad()
def estimate_loss(model: nn.Module, fwd, val_data: torch.Tensor, c: Config, device: str, ctx) -> float:
    """nanoGPT's estimate_loss on val: the mean of eval_iters random batches."""
    model.eval()
    losses = torch.zeros(c.eval_iters)
    for k in range(c.eval_iters):
        with ctx:
            losses[k] = fwd(*get_batch(val_data, c, device))[1].item()
    model.train()
    return float(losses.mean())


def train(c: Config, train_ids: np.ndarray, val_ids: np.ndarray, device: str, compile: bool) -> dict:
    """nanoGPT's loop. Returns the best estimate, its step, the kept model, the train seconds and tokens/s."""
    torch.manual_seed(c.seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_data = torch.from_numpy(train_ids.astype(np.int64))
    val_data = torch.from_numpy(val_ids.astype(np.int64))
    model = NanoGPT(c).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, c.beta2), fused=cuda)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    fwd = torch.compile(model) if compile else model

    best, best_step, best_state, train_s, curve = math.inf, 0, None, 0.0, []
    for it in range(c.max_iters + 1):
        if it % c.eval_interval == 0 and it > 0:
            val = estimate_loss(model, fwd, val_data, c, device, ctx)
            curve.append((it, val))
            if val < best:
                best, best_step = val, it
                best_state = copy.deepcopy(model.state_dict())
        if it == c.max_iters:
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = get_lr(it, c)
        x, y = get_batch(train_data, c, device)
        with ctx:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # sync, so the step time is honest
        train_s += time.perf_counter() - t0
    model.load_state_dict(best_state)
    return {
        "best_estimate": best,
        "best_step": best_step,
        "model": model.eval(),
        "train_s": train_s,
        "tokens_per_s": c.max_iters * c.batch_size * c.block_size / train_s,
        "curve": curve,
        "params": num_params(model),
    }
