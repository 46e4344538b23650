"""Looking inside the models (lm/inspection.py): attention maps of every attention family, head scores of
hand-built heads whose answers are known, the training-health recorder and the generation-quality scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lm import inspection as I
from lm.families import ModelConfig
from lm.health import HealthRecorder
from lm.models import REGISTRY, build_model

V = 11
ATTENTION = {
    "single_head": {"family": "single_head", "block_size": 8, "n_embd": 8},
    "multi_head": {"family": "multi_head", "block_size": 8, "n_embd": 8, "n_head": 2},
    "block": {"family": "block", "block_size": 8, "n_embd": 8, "n_head": 2},
    "gpt": {"family": "gpt", "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8},
    "llama": {"family": "llama", "block_size": 8, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "n_embd": 8},
}
LAYERS_HEADS = {"single_head": (1, 1), "multi_head": (1, 2), "block": (1, 2), "gpt": (2, 2), "llama": (2, 2)}


def test_every_attention_family_is_covered():
    """Every registered family with a window context (except the counted n-gram) has a tiny config here."""
    window = {f for f, m in REGISTRY.items() if getattr(m.Config, "context", None) == "window"}
    assert window - {"ngram"} == set(ATTENTION), window


@pytest.mark.parametrize("family", list(ATTENTION))
def test_attention_maps_are_causal_distributions_and_leave_the_output_alone(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig.parse(ATTENTION[family]), V).eval()
    idx = torch.randint(0, V, (3, 8))
    with torch.no_grad():
        expected, _ = model(idx)
        with I.capture_attention() as maps:
            got, _ = model(idx)
    assert F.scaled_dot_product_attention is not None and "recording" not in F.scaled_dot_product_attention.__name__
    n_layer, n_head = LAYERS_HEADS[family]
    assert len(maps) == n_layer and all(m.shape == (3, n_head, 8, 8) for m in maps)
    for m in maps:
        assert torch.all(m.triu(diagonal=1) == 0)  # nothing attends to the future
        assert torch.allclose(m.sum(-1), torch.ones(3, n_head, 8), atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)  # recording computes the same attention


class HandBuiltHead(nn.Module):
    """One attention head with hand-set scores (no training): 'previous' attends from t to t-1 only; 'induction'
    attends from t to the position right after an earlier occurrence of the current token (prefix matching)."""

    def __init__(self, kind: str, vocab: int, T: int):
        super().__init__()
        self.kind, self.vocab, self.T = kind, vocab, T
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        B, T = idx.shape
        big = 50.0
        if self.kind == "previous":
            q = F.one_hot(torch.arange(T), T + 1).float()  # position t
            k = F.one_hot(torch.arange(1, T + 1), T + 1).float()  # key j answers to query j + 1
            q, k = q.expand(B, T, -1), k.expand(B, T, -1)
        else:
            q = F.one_hot(idx, self.vocab).float()  # the current token
            prev = torch.cat([torch.full((B, 1), -1), idx[:, :-1]], dim=1)  # the token before each key position
            k = F.one_hot(prev + 1, self.vocab + 1)[..., 1:].float()  # (no token before position 0: zero key)
        q, k = (big * q)[:, None], k[:, None]  # (B, 1, T, d)
        y = F.scaled_dot_product_attention(q * math.sqrt(q.size(-1)), k, k, is_causal=True)
        return y.sum(-1).squeeze(1)[..., None].expand(B, T, self.vocab), None


def test_a_pure_previous_token_head_scores_one():
    model = HandBuiltHead("previous", V, 8)
    scores = I.head_scores(model, np.arange(200) % V, V, 8)
    assert scores["L0.H0"]["prev_token"] == pytest.approx(1.0, abs=1e-6)
    assert scores["L0.H0"]["induction"] < 0.05


def test_a_pure_induction_head_scores_one():
    model = HandBuiltHead("induction", 16, 12)
    scores = I.head_scores(model, np.arange(200) % 16, 16, 12)
    assert scores["L0.H0"]["induction"] == pytest.approx(1.0, abs=1e-6)
    assert I.clearest_heads(scores)["induction"][0] == "L0.H0"


def test_repeated_random_tokens_repeat_each_half():
    x = I.repeated_random_tokens(V, 5, batch=4, seed=1)
    assert x.shape == (4, 10) and torch.equal(x[:, :5], x[:, 5:])
    assert all(len(set(row[:5].tolist())) == 5 for row in x)  # distinct within a half: one earlier occurrence each


def test_the_health_recorder_counts_every_activation_and_gradient():
    torch.manual_seed(0)
    cfg = ModelConfig.parse({"family": "mlp", "block_size": 3, "n_embd": 4, "n_hidden": 16, "batchnorm": True})
    model = build_model(cfg, V).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = HealthRecorder()
    x, y = torch.randint(0, V, (5, 3)), torch.randint(0, V, (5, 3))
    rec.arm(model)
    _, loss = model(x, y)
    loss.backward()
    rec.after_backward(model)
    opt.step()
    r = rec.after_update(model, step=1, histograms=True)
    (name, act), = r["activations"].items()  # fmt: skip
    assert sum(act["counts"]) == 15 * 16 and 0 <= act["saturated"] <= 1 and act["limit"] == 1.0  # 15 windows x 16
    weights = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert set(r["gradients"]) == weights == set(r["update_ratio"])
    assert sum(r["gradients"]["hidden.weight"]["counts"]) == model.hidden.weight.numel()
    # SGD's update is lr * grad: the ratio is log10(0.1 * std(grad) / std(w)).
    g, w_before = model.hidden.weight.grad, model.hidden.weight.detach() + 0.1 * model.hidden.weight.grad
    assert r["update_ratio"]["hidden.weight"] == pytest.approx(
        math.log10(float((0.1 * g).std() / w_before.std())), abs=1e-4
    )
    assert not any(h for h in rec._hooks)  # hooks removed: later steps run unobserved


def test_bleu_and_chrf_are_sacrebleus():
    import sacrebleu

    hyp, ref = ["the cat sat on the mat today"], ["the cat sat on a mat today"]
    got = I.bleu_chrf(hyp, ref)
    assert (
        got["bleu"] == sacrebleu.corpus_bleu(hyp, [ref]).score
        and got["chrf"] == sacrebleu.corpus_chrf(hyp, [ref]).score
    )
    assert I.bleu_chrf(ref, ref)["bleu"] == pytest.approx(100.0)


def test_distinct_n_and_copy_rate():
    assert I.distinct_n(["a b a b"], 1) == 0.5 and I.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert I.copy_rate(["abcdefghij"], "xxabcdefghxx", 8) == pytest.approx(1 / 3)  # abcdefgh yes; bcdefghi, cdefghij no
    assert I.distinct_n([""], 2) == 0.0 and I.copy_rate(["short"], "short text", 8) == 0.0


def test_prompts_are_fixed_and_cut_from_the_val_text():
    text = "".join(f"line {i} of the play\n" for i in range(100))
    pairs = I.prompts(text, 4, 30, 20)
    assert pairs == I.prompts(text, 4, 30, 20) and len(pairs) == 4
    for p, c in pairs:
        assert len(p) == 30 and len(c) == 20 and (p + c) in text and p.startswith("line")
    with pytest.raises(ValueError, match="fewer than a prompt and continuation"):
        I.prompts("short", 2, 30, 20)
