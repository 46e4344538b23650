"""train.optimizer 'muon' (lm/muon.py): the Newton–Schulz step and the update against torch's own Muon and AdamW,
which parameters it trains, and training and resuming with it."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch.optim._muon import _zeropower_via_newtonschulz

from lm.config import RunConfig, TrainConfig
from lm.models import build_model
from lm.muon import EPS, NS_COEFFICIENTS, NS_STEPS, MuonAdamW, hidden_matrices, orthogonalize
from lm.trainer import make_optimizer

from tiny import CONFIGS


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_newton_schulz_in_bf16_is_torch_s_and_fp32_pushes_singular_values_towards_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = orthogonalize(g, dtype=torch.bfloat16)
    assert torch.equal(ours, _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, NS_STEPS, EPS).float())
    s = torch.linalg.svdvals(orthogonalize(g))  # fp32, the default
    assert s.min() > 0.6 and s.max() < 1.25, s  # the quintic's band, not exactly 1 (the Muon post)
    assert (orthogonalize(g) - ours).abs().max() < 0.05  # bf16 keeps ~3 digits


def _grads(params, step):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_the_muon_groups_step_as_torch_optim_muon_and_the_others_as_adamw():
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(12, 4, generator=gen), torch.randn(4, 12, generator=gen)]
    rest = [torch.randn(12, 4, generator=gen), torch.randn(4, generator=gen)]
    ours = [t.clone().requires_grad_() for t in mats + rest]
    ref = [t.clone().requires_grad_() for t in mats + rest]
    groups = [
        {"params": ours[:2], "muon": True, "lr_scale": 5.0, "weight_decay": 0.1},
        {"params": ours[2:3], "weight_decay": 0.1},
        {"params": ours[3:], "weight_decay": 0.0},
    ]
    opt = MuonAdamW(groups, lr=0.004, betas=(0.9, 0.99), ns_dtype=torch.bfloat16, foreach=True)
    muon = torch.optim.Muon(ref[:2], lr=0.02, weight_decay=0.1, momentum=0.95)
    adamw = torch.optim.AdamW(
        [{"params": ref[2:3], "weight_decay": 0.1}, {"params": ref[3:], "weight_decay": 0.0}],
        lr=0.004, betas=(0.9, 0.99), foreach=True,
    )  # fmt: skip
    for step in range(4):
        _grads(ours, step)
        _grads(ref, step)
        opt.step()
        muon.step()
        adamw.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], mats[0]) and not torch.equal(ours[3], rest[1])


def test_muon_refuses_a_group_that_is_not_matrices():
    with pytest.raises(ValueError, match=r"matrices only.*\(4,\)"):
        MuonAdamW([{"params": [torch.zeros(4, requires_grad=True)], "muon": True}], lr=0.1)


@pytest.mark.parametrize("family", ["gpt", "gpt_post_sin_tied", "gpt_switches", "llama", "llama_mqa_tied"])
def test_muon_trains_the_attention_and_feed_forward_matrices_only(family):
    model = build_model(CONFIGS[family], 11)
    hidden = hidden_matrices(model)
    assert hidden and all(".attn." in n or ".mlp." in n or "attention" in n or "feed_forward" in n for n in hidden)
    for n, p in model.named_parameters():  # embeddings, the head (tied or not), norms and biases stay with AdamW
        if p.ndim < 2 or "wte" in n or "wpe" in n or "lm_head" in n:
            assert n not in hidden, n
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=0.004, weight_decay=0.1))
    muon_group, *adamw_groups = opt.param_groups
    assert muon_group["muon"] and muon_group["lr_scale"] == pytest.approx(0.02 / 0.004)
    named = dict(model.named_parameters())
    assert {id(p) for p in muon_group["params"]} == {id(named[n]) for n in hidden}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_muon_on_a_family_without_hidden_matrices_says_to_use_adamw():
    model = build_model(CONFIGS["bigram_nn"], 11)
    with pytest.raises(ValueError, match="has none: use 'adamw'"):
        make_optimizer(model, TrainConfig(optimizer="muon"))


def test_muon_lr_belongs_to_muon():
    with pytest.raises(ValidationError, match="muon_lr is the learning rate of optimizer 'muon'"):
        TrainConfig(muon_lr=0.02)
    assert TrainConfig(optimizer="muon", muon_lr=0.01).muon_lr == 0.01


def test_training_with_muon_lowers_the_loss_and_is_seeded():
    from test_train import V, run_cfg, train_once

    run = run_cfg("gpt", optimizer="muon", max_steps=60, lr=1e-2)
    m1, r1 = train_once(run)
    m2, r2 = train_once(run)
    assert r1.curve == r2.curve and all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert r1.curve[-1]["val_loss"] < math.log(V) - 0.3, r1.curve


def test_resume_with_muon_is_bit_identical(tmp_path):
    import test_train

    run = test_train.run_cfg("gpt", optimizer="muon", checkpoint_interval=10, max_steps=40)
    run = RunConfig.model_validate(run.model_dump() | {"model": run.model.model_dump() | {"dropout": 0.2}})
    ref_model, ref = test_train._fit(run, None)

    def crash(row):
        if row["step"] == 30:
            raise test_train.Crash

    state = tmp_path / ".m.resume"
    with pytest.raises(test_train.Crash):
        test_train._fit(run, state, on_eval=crash)
    model, result = test_train._fit(run, state)
    assert result.curve == ref.curve
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
