"""The LLaMA rung: the transformer's switches (RMSNorm, rotary, SwiGLU, no bias, GQA), the llama family, its
published parameter counts and its rotary KV cache. The shared contract (shapes, causality, initial loss,
overfitting one batch, bit-identical reruns) runs in tests/test_models.py for 'gpt_switches' and 'llama'."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lm.families import GPTConfig, LlamaConfig
from lm.generate import generate, sample_next
from lm.model_size import REFERENCES, param_report
from lm.models import build_model
from lm.models.attention import CausalSelfAttention
from lm.models.kv_cache import KVCache
from lm.models.positions import Rotary, apply_rotary


def test_llama_references_count_exactly():
    """Llama 3.2 1B and Llama 2 7B, built on the meta device, by component as GPT-2 is counted."""
    r = param_report(REFERENCES["llama-3.2-1b"].model, REFERENCES["llama-3.2-1b"].vocab_size)
    assert r.counts.total == 1_235_814_400
    c = r.counts.components
    assert c["token_embedding"] == 128_256 * 2048 and c["head"] == 0  # tied: the head is the embedding
    assert c["attention"] == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512)  # q, o full; k, v at 8 of 32 heads
    assert c["feed_forward"] == 16 * 3 * 2048 * 8192 and c["norm"] == 33 * 2048 and c["position_embedding"] == 0
    assert r.untied.total == 1_235_814_400 + 128_256 * 2048

    r = param_report(REFERENCES["llama-2-7b"].model, REFERENCES["llama-2-7b"].vocab_size)
    assert r.counts.total == 6_738_415_616
    assert r.model.hidden == 11_008  # LLaMA's rule: 2/3 of 4·4096, rounded up to a multiple of 256
    assert r.counts.components["head"] == r.counts.components["token_embedding"] == 32_000 * 4096
    assert r.counts.blocks[0]["attention"] == 4 * 4096**2 and len(r.counts.blocks) == 32


def test_lm_params_prints_the_totals():
    for name, total, shape in [
        ("llama-3.2-1b", "1,235,814,400", "16 layers, 32 heads, 8 KV heads, n_embd 2,048, 8,192 hidden"),
        ("llama-2-7b", "6,738,415,616", "32 layers, 32 heads, n_embd 4,096, 11,008 hidden"),
    ]:
        out = subprocess.run([sys.executable, "-m", "lm.cli", "params", name], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        (total_line,) = [line for line in out.stdout.splitlines() if line.startswith("total")]
        assert total in total_line and shape in out.stdout, out.stdout


def test_llama_config_fixes_its_choices():
    with pytest.raises(ValueError, match="Input should be 'rope'"):
        LlamaConfig(family="llama", pos="learned")
    with pytest.raises(ValueError, match="n_kv_head \\(3\\) must divide n_head \\(4\\)"):
        LlamaConfig(family="llama", n_head=4, n_kv_head=3, n_embd=16)
    with pytest.raises(ValueError, match="head size .* must be even"):
        GPTConfig(family="gpt", n_head=4, n_embd=12, pos="rope")


def test_rotary_scores_depend_on_relative_position_only():
    """Shifting every position by the same offset leaves every q·k score unchanged (RoFormer §3.4.3)."""
    torch.manual_seed(0)
    rotary = Rotary(8, 10000.0)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    pos = torch.arange(5)
    scores = [apply_rotary(q, *rotary(pos + s)) @ apply_rotary(k, *rotary(pos + s)).transpose(-1, -2) for s in (0, 37)]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)
    # ... and rotation preserves norms (it is a rotation) while position 0 is the identity.
    torch.testing.assert_close(apply_rotary(q, *rotary(pos + 3)).norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(q[:, :, :1], *rotary(torch.tensor([0]))), q[:, :, :1])


def test_gqa_equals_mha_with_shared_key_value_heads():
    """Grouped-query attention with 2 KV heads = multi-head attention whose 4 heads' keys and values are the
    2 KV heads repeated (head j serves query heads 2j, 2j+1), and n_kv_head = n_head is plain MHA."""
    torch.manual_seed(0)
    C, hs = 16, 4
    gqa = CausalSelfAttention(C, 4, n_kv_head=2)
    mha = CausalSelfAttention(C, 4, n_kv_head=4)
    q, k, v = gqa.c_attn.weight.split([4 * hs, 2 * hs, 2 * hs])
    repeat = lambda w: w.view(2, hs, C).repeat_interleave(2, dim=0).reshape(4 * hs, C)  # noqa: E731
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([q, repeat(k), repeat(v)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
    x = torch.randn(2, 7, C)
    torch.testing.assert_close(gqa(x), mha(x))
    assert gqa.c_attn.weight.shape == (32, C) and mha.c_attn.weight.shape == (48, C)
    plain = CausalSelfAttention(C, 4)
    plain.load_state_dict(mha.state_dict())
    torch.testing.assert_close(plain(x), mha(x))


def test_gqa_cache_holds_kv_heads_only():
    m = build_model(LlamaConfig(family="llama", block_size=8, n_embd=16, n_head=4, n_kv_head=2, n_layer=2), 11)
    cache = m.new_cache(3)
    assert cache.k.shape == (2, 3, 2, 16, 4) and cache.window == 8  # rolling: two windows, compacted once per window


def test_swiglu_hidden_keeps_parameters_within_two_percent():
    """The ablation's SwiGLU width (n_hidden 341 at n_embd 128) costs what GELU's 4x MLP does, within 2%."""
    base = dict(family="gpt", block_size=64, n_layer=4, n_head=4, n_embd=128)
    gelu = param_report(GPTConfig(**base), 65).counts.components["feed_forward"]
    swiglu = param_report(GPTConfig(**base, mlp="swiglu", n_hidden=341), 65).counts.components["feed_forward"]
    assert abs(swiglu - gelu) / gelu < 0.02


def _sampled(m, x, n, **kw):
    return generate(m, x, n, temperature=1.0, generator=torch.Generator().manual_seed(7), **kw)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_sliding_cache_equals_uncached_sliding_window(n_layer):
    """Past block_size the rotary cache rolls (no refill), and computes what the uncached path computes: the
    same sampled tokens over three windows; with one layer that is exactly the cropped window of nanoGPT."""
    torch.manual_seed(n_layer)
    cfg = LlamaConfig(family="llama", block_size=8, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=16, multiple_of=8)
    m = build_model(cfg, 11).eval()
    for p in m.parameters():  # larger weights than init: peaked, position-sensitive predictions
        p.data.mul_(8.0)
    x = torch.randint(0, 11, (3, 5))
    cached = _sampled(m, x, 24)
    assert torch.equal(cached, _sampled(m, x, 24, use_cache=False))
    assert len(set(cached[0].tolist())) > 3  # not a degenerate repetition
    if n_layer == 1:
        seq, g = x, torch.Generator().manual_seed(7)
        for _ in range(24):
            logits, _ = m(seq[:, -8:])  # crop to block_size and recompute
            seq = torch.cat([seq, sample_next(logits[:, -1], generator=g)], dim=1)
        assert torch.equal(seq, cached)


def test_roll_keeps_the_newest_keys_and_counts_positions():
    cache = KVCache(1, 1, 1, 2, 4)
    for t in range(4):
        cache.update(0, torch.full((1, 1, 1, 2), float(t)), torch.full((1, 1, 1, 2), float(t)))
        cache.advance(1)
    cache.roll(1)
    assert cache.length == 3 and cache.offset == 1
    assert cache.k[0, 0, 0, :3, 0].tolist() == [1.0, 2.0, 3.0]


def test_learned_positions_never_roll():
    gpt = build_model(GPTConfig(family="gpt", block_size=8, n_layer=1, n_head=2, n_embd=16), 11)
    assert (
        not gpt.rolls and build_model(GPTConfig(family="gpt", block_size=8, n_head=2, n_embd=16, pos="rope"), 11).rolls
    )
    with pytest.raises(ValueError, match="exceeds block_size"):
        gpt(torch.zeros(1, 9, dtype=torch.long))
