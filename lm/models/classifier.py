"""A language model of the ladder turned into a sequence classifier.

References: A. Radford, K. Narasimhan, T. Salimans, I. Sutskever, "Improving Language Understanding by Generative
Pre-Training", 2018 (§3.2: a linear layer on the final transformer state of the input's last token, the model
fine-tuned end to end); S. Raschka, "Build a Large Language Model (From Scratch)", ch. 6 (the same on GPT-2 for SMS
spam, training only the last block, the final norm and the new head).

Not a family of the ladder (it predicts labels, not tokens), so it does not join the registry; it wraps one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.models.causal_lm import INIT_STD, CausalLM

PAD = -1
"""Input id of the padding after a message's tokens (right padding). It never reaches the embedding: the
classifier reads each row's length from it and embeds id 0 in its place, which the last real token cannot see
(causal attention)."""

Trainable = Literal["head", "last_block", "all"]


class Classifier(nn.Module):
    """``lm`` (a transformer of the ladder) with its LM head replaced by ``head``: Linear(n_embd, n_labels) on the
    hidden state of each row's last real token, after the final norm.

    ``forward(idx (B, T), targets (B, 1) | None) -> (logits (B, 1, L), loss | None)``: one scored position per row,
    so the training loop and scorer of the language models (lm/trainer.py, lm/metrics.py) run it unchanged.

    ``extra_unk``: grow the token embedding by one row, the id :attr:`unk_id` for characters the pretrained
    vocabulary lacks, initialised to the mean of the pretrained rows (an average character, not a random one).
    """

    def __init__(self, lm: CausalLM, n_labels: int, *, extra_unk: bool = False):
        super().__init__()
        if not isinstance(lm, CausalLM) or not hasattr(lm.transformer, "h"):
            raise ValueError(
                f"a classifier needs a transformer's hidden states (families gpt, llama, block); "
                f"{type(lm).__name__} has no transformer blocks"
            )
        self.cfg = lm.cfg  # the loop asks cfg.fitting ('gradient')
        self.block_size = lm.block_size
        wte = lm.transformer.wte
        self.unk_id: int | None = None
        if extra_unk:
            grown = nn.Embedding(wte.num_embeddings + 1, wte.embedding_dim)
            with torch.no_grad():
                grown.weight[:-1] = wte.weight
                grown.weight[-1] = wte.weight.mean(0)
            lm.transformer.wte = grown
            self.unk_id = wte.num_embeddings
        lm.lm_head = nn.Identity()  # lm(idx) now returns the final hidden states (a tied head shares wte: kept there)
        self.lm = lm
        self.head = nn.Linear(lm.n_embd, n_labels)
        nn.init.normal_(self.head.weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        lengths = (idx != PAD).sum(1)  # (B,) real tokens come first, padding after
        if bool((lengths == 0).any()):
            raise ValueError("a row of the batch has no tokens (every id is PAD)")
        h, _ = self.lm(idx.clamp(min=0))  # (B, T, C): id 0 under the padding, unseen by earlier positions
        last = h[torch.arange(B, device=idx.device), lengths - 1]  # (B, C) the last real token's state
        logits = self.head(last).unsqueeze(1)  # (B, C) -> (B, 1, L): one scored position per row
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def train_only(self, trainable: Trainable) -> None:
        """Freeze every parameter, then unfreeze the head and, for 'last_block', the last block and the final norm
        (where the model has one), or everything for 'all'."""
        for p in self.parameters():
            p.requires_grad_(trainable == "all")
        parts = [self.head]
        if trainable == "last_block":
            parts.append(self.lm.transformer.h[-1])
            if "ln_f" in self.lm.transformer:
                parts.append(self.lm.transformer.ln_f)
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(True)

    def layer_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The last real token's hidden state after the embeddings and after each block: n_layer + 1 tensors
        (B, C), for linear probes (lm/probe.py). The final norm is not a layer here: it rescales each state."""
        B = idx.shape[0]
        lengths = (idx != PAD).sum(1)  # (B,)
        states: list[torch.Tensor] = []
        rows = torch.arange(B, device=idx.device)

        def keep(module, inputs, output):
            states.append(output[rows, lengths - 1])  # (B, T, C) -> (B, C)

        hooks = [self.lm.transformer.drop.register_forward_hook(keep)]
        hooks += [block.register_forward_hook(keep) for block in self.lm.transformer.h]
        try:
            self.lm(idx.clamp(min=0))
        finally:
            for hook in hooks:
                hook.remove()
        return states
