"""Contract tests for every model family (lm.models): shapes, causality, init, overfitting,
determinism, padding, exact parameter counts, BatchNorm modes.

The tiny configs of tests/tiny.py (V=11, n_embd 16, block 8) on the CPU; the big counting configs are built on the
meta device, so they cost no memory.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lm.families import (
    BigramCountsConfig,
    BigramNNConfig,
    GPTConfig,
    MLPConfig,
    WaveNetConfig,
    families,
)
from lm.models import COMPONENTS, REGISTRY, build_model

from tiny import CONFIGS

V = 11
B = 4

ALL = list(CONFIGS)
ATTENTION = [k for k, c in CONFIGS.items() if c.context == "window"]
FIXED_CONTEXT = [k for k, c in CONFIGS.items() if c.context == "fixed" and c.block_size > 1]
BATCHNORM = ["mlp_bn", "wavenet"]
TRAINABLE = [k for k, c in CONFIGS.items() if c.fitting == "gradient"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, seed: int = 0, vocab_size: int = V, fit: bool = True):
    """Build a tiny model; bigram_counts is also fitted (on a fixed random batch) unless
    ``fit`` is False, since unfitted it is exactly uniform and its logits ignore the input."""
    torch.manual_seed(seed)
    m = build_model(CONFIGS[name], vocab_size)
    if fit and m.cfg.fitting == "counting":
        x, y = batch(1000 + seed, b=16)
        m.accumulate(x, y)
    return m


def batch(seed: int, b: int = B, t: int = 8, vocab_size: int = V):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (b, t), generator=g), torch.randint(0, vocab_size, (b, t), generator=g)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# registry


def test_registry_has_every_family():
    assert set(REGISTRY) == set(families())
    assert {c.family for c in CONFIGS.values()} == set(families())


def test_declared_contract():
    """What each family declares, read back: the bigrams count / see one token, the attention families
    window their input and cache keys and values."""
    assert [f for f in families() if REGISTRY[f].Config.fitting == "counting"] == ["bigram_counts", "ngram"]
    assert [f for f in families() if REGISTRY[f].kv_cache] == ["single_head", "multi_head", "block", "gpt", "llama"]
    assert all(REGISTRY[f].kv_cache == (REGISTRY[f].Config.context == "window") for f in families())
    assert BigramNNConfig(family="bigram_nn").block_size == 1 == BigramCountsConfig(family="bigram_counts").block_size


def test_build_model_rejects_unknown_family():
    class Fake:
        family = "trigram"

    with pytest.raises(ValueError, match="unknown model family 'trigram'; must be one of bigram_counts.*gpt"):
        build_model(Fake(), V)


@pytest.mark.parametrize("name", ALL)
def test_contract_attributes(name):
    m = make(name)
    cfg = CONFIGS[name]
    assert m.cfg is cfg
    assert isinstance(m, REGISTRY[cfg.family])
    assert m.block_size == cfg.block_size == (1 if cfg.family.startswith("bigram") else cfg.block_size)


# ------------------------------------------------------------------------------------------
# shapes and loss


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_loss(name):
    m = make(name)
    x, y = batch(1)
    logits, loss = m(x)
    assert logits.shape == (B, 8, V)
    assert loss is None
    logits, loss = m(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # The loss is the plain mean cross-entropy over all B*T positions.
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)))
    # Shorter sequences work for every family.
    logits, _ = m(x[:, :3])
    assert logits.shape == (B, 3, V)


@pytest.mark.parametrize("name", ["bigram_counts", "bigram_nn", *FIXED_CONTEXT])
def test_any_length_for_fixed_context_models(name):
    m = make(name).eval()
    for t in (1, 5, 8, 21):
        x, _ = batch(t, t=t)
        assert m(x)[0].shape == (B, t, V)


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_rejects_too_long(name):
    """Absolute positions end at block_size; rotary models read longer inputs as sliding-window attention,
    where a position's prediction equals that of its last block_size tokens alone for one layer."""
    m = make(name).eval()
    x, _ = batch(0, t=9)
    if not m.rolls:
        with pytest.raises(ValueError, match="block_size"):
            m(x)
        return
    logits, _ = m(x)
    assert logits.shape == (B, 9, V)
    torch.testing.assert_close(logits[:, :8], m(x[:, :8])[0])  # the first block_size positions: plain causal
    if m.cfg.n_layer == 1:
        torch.testing.assert_close(logits[:, -1], m(x[:, 1:])[0][:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_ignore_index(name):
    m = make(name).eval()
    x, y = batch(2)
    y_pad = y.clone()
    y_pad[:, 5:] = -1  # padding after the end of short sequences
    y_pad[0, :] = -1
    with torch.no_grad():
        logits, loss = m(x, y_pad)
    keep = y_pad != -1
    expected = F.cross_entropy(logits[keep], y_pad[keep])  # mean over the kept positions only
    torch.testing.assert_close(loss, expected)
    # What the ignored targets were does not matter.
    assert not torch.equal(y, y_pad)
    with torch.no_grad():
        loss_full = m(x, y)[1]
    assert not torch.equal(loss, loss_full)


# ------------------------------------------------------------------------------------------
# causality and windows


@pytest.mark.parametrize("name", ALL)
def test_causality(name):
    m = make(name).eval()  # eval: BatchNorm uses running stats, dropout is off
    x, _ = batch(3, b=2)
    k = m.block_size
    with torch.no_grad():
        base = m(x)[0]
        for t in range(x.shape[1]):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 1) % V
            out = m(x2)[0]
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)  # the past never sees t
            assert not torch.allclose(out[:, t], base[:, t])  # ... but position t does
            if name in FIXED_CONTEXT or name.startswith("bigram"):
                # Fixed context: position t + k and later are out of reach of token t.
                torch.testing.assert_close(out[:, t + k :], base[:, t + k :], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FIXED_CONTEXT)
def test_windows_pad_with_zero(name):
    """Windows start with id 0 ('.' on names): explicit zeros in front give the same logits."""
    m = make(name).eval()
    k = m.block_size
    x, _ = batch(4, t=6)
    with torch.no_grad():
        plain = m(x)[0]
        padded = m(torch.cat([torch.zeros(B, k - 1, dtype=torch.long), x], dim=1))[0][:, k - 1 :]
        torch.testing.assert_close(plain, padded, rtol=0, atol=1e-6)
        # Each position's logits are those of its own window seen alone.
        for t in range(x.shape[1]):
            alone = m(x[:, max(0, t - k + 1) : t + 1])[0][:, -1]
            torch.testing.assert_close(plain[:, t], alone, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# initialisation and learning


@pytest.mark.parametrize("name", ALL)
def test_initial_loss_near_uniform(name):
    losses = []
    for seed in range(3):
        m = make(name, seed=seed, fit=False)
        x, y = batch(10 + seed, b=16)
        with torch.no_grad():
            losses.append(m(x, y)[1].item())
    mean = sum(losses) / len(losses)
    assert abs(mean - math.log(V)) < 0.1, losses
    if name == "bigram_counts":  # uniform exactly before fitting
        assert all(math.isclose(v, math.log(V), rel_tol=1e-6) for v in losses)


@pytest.mark.parametrize("n_embd", [384, 768])
def test_initial_loss_wide_gpt(n_embd):
    """The capped LM-head init keeps wide untied models near ln V too (GPT-2's 0.02 would give +0.15 at 768)."""
    torch.manual_seed(0)
    m = build_model(GPTConfig(family="gpt", n_layer=1, n_head=6, n_embd=n_embd, block_size=16), 65)
    x, y = batch(0, b=8, t=16, vocab_size=65)
    with torch.no_grad():
        loss = m(x, y)[1].item()
    assert abs(loss - math.log(65)) < 0.1


def bigram_entropy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Empirical conditional entropy H(y | x) of the (x, y) pairs with y != -1, in nats."""
    keep = y != -1
    pairs = Counter(zip(x[keep].tolist(), y[keep].tolist()))
    ctx = Counter(x[keep].tolist())
    n = sum(pairs.values())
    return -sum(c * math.log(c / ctx[a]) for (a, _), c in pairs.items()) / n


def test_bigram_counts_fit_reaches_empirical_entropy():
    torch.manual_seed(0)
    m = build_model(BigramCountsConfig(family="bigram_counts", smoothing=0.0), V)
    x, y = batch(5)
    y[:, -2:] = -1  # padding pairs are not counted
    m.accumulate(x, y)
    assert m.counts.sum().item() == (y != -1).sum().item()
    loss = m(x, y)[1].item()
    assert math.isclose(loss, bigram_entropy(x, y), rel_tol=1e-5)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 0  # counted, not trained
    # Refitting accumulates.
    m.accumulate(x, y)
    assert m.counts.sum().item() == 2 * (y != -1).sum().item()
    assert math.isclose(m(x, y)[1].item(), bigram_entropy(x, y), rel_tol=1e-5)


def test_bigram_counts_smoothing_and_empty_rows():
    m = build_model(BigramCountsConfig(family="bigram_counts", smoothing=0.0), V)
    m.accumulate(torch.tensor([1, 1, 2]), torch.tensor([2, 3, -1]))
    lp = m.log_probs
    assert torch.isfinite(lp[0]).all() and torch.allclose(lp[0].exp(), torch.full((V,), 1 / V))  # unseen row: uniform
    torch.testing.assert_close(lp[1, [2, 3]].exp(), torch.tensor([0.5, 0.5]))
    assert not torch.isnan(lp).any()
    # add-1 smoothing as makemore: (count + 1) / (row + V)
    m1 = build_model(BigramCountsConfig(family="bigram_counts", smoothing=1.0), V)
    m1.accumulate(torch.tensor([1, 1, 2]), torch.tensor([2, 3, 4]))
    torch.testing.assert_close(m1.log_probs[1, 2].exp().item(), 2 / (2 + V))
    # The fitted table survives a state-dict round trip.
    m2 = build_model(BigramCountsConfig(family="bigram_counts", smoothing=1.0), V)
    m2.load_state_dict(m1.state_dict())
    assert torch.equal(m2.log_probs, m1.log_probs) and torch.equal(m2.counts, m1.counts)


def train(m, x, y, steps: int = 200, lr: float = 1e-2) -> float:
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        return m(x, y)[1].item()


@pytest.mark.parametrize("name", TRAINABLE)
def test_overfits_one_batch(name):
    m = make(name)
    x, y = batch(6)
    y[3, 6:] = -1
    with torch.no_grad():
        init = m(x, y)[1].item()
    final = train(m, x, y)
    if name == "bigram_nn":
        # A bigram model cannot beat the batch's own bigram entropy (0.98 nats here); 200 steps
        # get within ~0.2 of it (the remaining gap is log-probabilities still heading to -inf).
        h = bigram_entropy(x, y)
        assert h - 1e-4 <= final <= h + 0.3, (final, h)
    else:
        # Models with context memorise 32 random positions almost perfectly.
        assert final < 0.3, (init, final)
    assert final < init - 1.0


# ------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("name", ALL)
def test_bit_identical_reruns(name):
    m1, m2 = make(name, seed=123), make(name, seed=123)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    x, y = batch(7)
    for mode in ("train", "eval"):
        getattr(m1, mode)(), getattr(m2, mode)()
        torch.manual_seed(5)  # dropout masks come from the global RNG
        l1, loss1 = m1(x, y)
        torch.manual_seed(5)
        l2, loss2 = m2(x, y)
        assert torch.equal(l1, l2) and torch.equal(loss1, loss2)
    if name != "bigram_counts":
        m3 = make(name, seed=124)
        assert any(not torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))


@pytest.mark.parametrize("name", ["block_post", "gpt"])
def test_dropout_only_in_training(name):
    m = make(name)
    x, _ = batch(8)
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])


# ------------------------------------------------------------------------------------------
# BatchNorm


@pytest.mark.parametrize("name", BATCHNORM)
def test_batchnorm_train_vs_eval(name):
    m = make(name)
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm1d)]
    assert bns
    x, y = batch(9, b=8)
    # Train mode: batch statistics, running stats move, rows depend on the rest of the batch.
    m.train()
    before = [bn.running_mean.clone() for bn in bns]
    full = m(x)[0]
    assert all(not torch.equal(b0, bn.running_mean) for b0, bn in zip(before, bns))
    assert not torch.allclose(m(x[:2])[0], full[:2])
    # Eval mode: running stats; nothing is updated; each row is independent of the batch.
    m.eval()
    frozen = [bn.running_mean.clone() for bn in bns]
    with torch.no_grad():
        full = m(x)[0]
        torch.testing.assert_close(m(x[:2])[0], full[:2], rtol=0, atol=1e-6)
        assert all(torch.equal(f, bn.running_mean) for f, bn in zip(frozen, bns))
        # ... and the running stats are what eval mode uses.
        bns[0].running_mean += 1.0
        assert not torch.allclose(m(x)[0], full)
        bns[0].running_mean -= 1.0
    m.train()
    bns[0].running_mean += 1.0  # train mode ignores the running stats
    torch.manual_seed(0)
    a = m(x)[0]
    bns[0].running_mean -= 1.0
    torch.manual_seed(0)
    torch.testing.assert_close(a, m(x)[0])


# ------------------------------------------------------------------------------------------
# parameter counts (the study's published configurations)

PUBLISHED = [
    ("bigram_counts 27", BigramCountsConfig(family="bigram_counts"), 27, 729),
    ("bigram_nn 27", BigramNNConfig(family="bigram_nn"), 27, 729),
    ("mlp k3 e5 h200", MLPConfig(family="mlp", block_size=3, n_embd=5, n_hidden=200), 27, 8_762),
    ("mlp+bn k3 e10 h200", MLPConfig(family="mlp", block_size=3, n_embd=10, n_hidden=200, batchnorm=True), 27, 12_097),
    ("wavenet k8 e20 h200", WaveNetConfig(family="wavenet", block_size=8, n_embd=20, n_hidden=200), 27, 175_767),
    (
        "gpt, Let's build GPT",
        GPTConfig(
            family="gpt", n_layer=6, n_head=6, n_embd=384, block_size=256, bias=True, qkv_bias=False, head_bias=True
        ),
        65,
        10_788_929,
    ),
    (
        "gpt-2 small",
        GPTConfig(
            family="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, qkv_bias=False, head_bias=False
        ),
        50257,
        163_009_536,
    ),
    (
        "gpt-2 small tied",
        GPTConfig(family="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, head_bias=False, tie_weights=True),
        50257,
        124_412_160,
    ),
]


@pytest.mark.parametrize("label,cfg,vocab,expected", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_param_counts(label, cfg, vocab, expected):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = build_model(cfg, vocab)
    assert n_params(m) == expected


def test_wavenet_76579_needs_bias_free_linears():
    """makemore part 5's published net (k 8, emb 24, hidden 128): 76,579 only without the
    fusion Linears' biases (bias=False before BatchNorm); with them it is 76,963."""
    cfg = WaveNetConfig(family="wavenet", block_size=8, n_embd=24, n_hidden=128)
    assert n_params(build_model(cfg, 27)) == 76_579 + 3 * 128

    m = build_model(WaveNetConfig(family="wavenet", block_size=8, n_embd=24, n_hidden=128, bias=False), 27)
    assert n_params(m) == 76_579
    assert all(level.fc.bias is None for level in m.levels)


def test_gpt_variants():
    base = dict(family="gpt", n_layer=2, n_head=4, n_embd=16, block_size=8)
    torch.manual_seed(0)
    tied = build_model(GPTConfig(**base, tie_weights=True), V)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = build_model(GPTConfig(**base), V)
    assert n_params(untied) - n_params(tied) == V * 16
    sin = build_model(GPTConfig(**base, pos="sinusoidal"), V)
    assert n_params(untied) - n_params(sin) == 8 * 16  # fixed buffer, no parameters
    assert "transformer.wpe.table" not in sin.state_dict()  # recomputed, not stored
    post = build_model(GPTConfig(**base, norm="post"), V)
    assert "ln_f" not in post.transformer and "ln_f" in untied.transformer
    nobias = build_model(GPTConfig(**base, bias=False), V)
    assert all(not n.endswith("bias") for n, _ in nobias.named_parameters())
    qkv = build_model(GPTConfig(**base, qkv_bias=True, head_bias=True), V)
    assert n_params(qkv) - n_params(untied) == 2 * 3 * 16 + V


# ------------------------------------------------------------------------------------------
# parameter components


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_has_a_component(name):
    m = make(name)
    for pname, _ in m.named_parameters():
        assert m.component_of(pname) in COMPONENTS
        assert m.component_of(pname) != "other", pname


@pytest.mark.parametrize(
    "family, name, component",
    [
        ("gpt", "transformer.wte.weight", "token_embedding"),
        ("gpt", "_orig_mod.transformer.wpe.weight", "position_embedding"),
        ("gpt", "transformer.h.3.attn.c_attn.weight", "attention"),
        ("gpt", "transformer.h.3.attn.c_proj.bias", "attention"),
        ("gpt", "transformer.h.3.mlp.c_fc.weight", "feed_forward"),
        ("gpt", "module.transformer.h.3.mlp.c_proj.weight", "feed_forward"),
        ("gpt", "transformer.h.3.ln_1.weight", "norm"),
        ("gpt", "transformer.ln_f.bias", "norm"),
        ("single_head", "transformer.attn.c_attn.weight", "attention"),
        ("wavenet", "levels.0.bn.weight", "norm"),
        ("wavenet", "levels.0.fc.weight", "feed_forward"),
        ("mlp", "hidden.weight", "feed_forward"),
        ("mlp", "bn.bias", "norm"),
        ("mlp", "lm_head.weight", "head"),
        ("bigram_counts", "log_probs", "token_embedding"),
        ("bigram_nn", "wte.weight", "token_embedding"),
        ("gpt", "something.else", "other"),
    ],
)
def test_component_maps(family, name, component):
    assert REGISTRY[family].component_of(name) == component


def test_gpt2_small_distribution_matches_seed_003():
    cfg = GPTConfig(family="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, head_bias=False)
    with torch.device("meta"):
        m = build_model(cfg, 50257)
    shares = Counter()
    for pname, p in m.named_parameters():
        shares[m.component_of(pname)] += p.numel()
    assert shares["token_embedding"] == 38_597_376
    assert shares["feed_forward"] == 12 * 4_722_432
    assert shares["attention"] == 12 * 2_360_064
    assert shares["head"] == 38_597_376
    assert sum(shares.values()) == 163_009_536
