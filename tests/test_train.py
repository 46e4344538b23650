"""The training loop, checkpoints and evaluation, on synthetic token streams (no pipeline needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lm import checkpoint
from lm.batches import Batches, for_model
from lm.config import RunConfig, TrainConfig
from lm.evaluate import generate, metrics, score
from lm.models import build_model
from lm.train import DivergedError, fit, lr_at

V = 13
RNG = np.random.default_rng(0)
# A learnable stream: the next token is usually (token + 1) mod V.
STREAM = np.cumsum(RNG.choice([1, 1, 1, 2], size=4000)) % V
NAMES = np.concatenate([[0]] + [np.r_[RNG.integers(1, V, RNG.integers(2, 7)), 0] for _ in range(300)])

TINY = {
    "bigram_counts": {"family": "bigram_counts"},
    "bigram_nn": {"family": "bigram_nn"},
    "mlp": {"family": "mlp", "block_size": 3, "n_embd": 4, "n_hidden": 16, "batchnorm": True},
    "wavenet": {"family": "wavenet", "block_size": 4, "n_embd": 4, "n_hidden": 16},
    "gpt": {"family": "gpt", "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16},
}


def run_cfg(family: str, **train) -> RunConfig:
    steps = {} if family == "bigram_counts" else {"max_steps": 30, "eval_interval": 10, "eval_batches": 2}
    return RunConfig.model_validate({"tokenizer": "t", "model": TINY[family], "train": {"batch_size": 8, "lr": 3e-3, **steps, **train}})


def train_once(run: RunConfig, data=STREAM, fmt="text"):
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, V)
    b = lambda ids: for_model(run.model, ids, fmt, 0)  # noqa: E731
    result = fit(model, b(data[:3000] if fmt == "text" else data), b(data[3000:] if fmt == "text" else data), run.train,
                 device=torch.device("cpu"), progress=False)
    return model, result


@pytest.mark.parametrize("family", list(TINY))
def test_same_seed_same_curve_and_weights(family):
    run = run_cfg(family)
    m1, r1 = train_once(run)
    m2, r2 = train_once(run)
    strip = lambda c: [{k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s")} for row in c]  # noqa: E731
    assert strip(r1.curve) == strip(r2.curve)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("family", ["bigram_nn", "mlp", "gpt"])
def test_training_lowers_the_loss(family):
    _, r = train_once(run_cfg(family, max_steps=60, lr=1e-2))
    assert r.curve[-1]["val_loss"] < math.log(V) - 0.3, r.curve


def test_names_training_runs_on_rows():
    _, r = train_once(run_cfg("gpt"), NAMES, "lines")
    assert len(r.curve) == 3 and all(math.isfinite(row["val_loss"]) for row in r.curve)


def test_lr_schedules():
    cos = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cos) == pytest.approx(1 / 11) and lr_at(10, cos) == pytest.approx(1.0)
    assert lr_at(99, cos) == pytest.approx(0.1, abs=1e-3)
    step = TrainConfig(max_steps=100, lr=0.1, schedule="step", step_at=[0.5, 0.75], step_gamma=0.1)
    assert [lr_at(s, step) for s in (0, 49, 50, 75)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_divergence_stops_with_the_step():
    run = run_cfg("gpt", optimizer="sgd", beta1=0.0, lr=100.0, grad_clip=0.0, max_steps=200)
    with pytest.raises(DivergedError, match="at step"):
        train_once(run)


@pytest.mark.parametrize("family", list(TINY))
def test_checkpoint_round_trip_and_eval_determinism(family, tmp_path):
    run = run_cfg(family)
    model, _ = train_once(run)
    checkpoint.save(model, run, V, tmp_path)
    loaded, run2, v = checkpoint.load(tmp_path)
    assert run2 == run and v == V
    val = for_model(run.model, STREAM[3000:], "text", 0)
    a, b = score(model.eval(), val, 7), score(loaded, val, 64)
    assert a[1] == b[1] == len(STREAM[3000:]) - 1  # every token but the first, whatever the batch size
    assert a[0] == pytest.approx(b[0], rel=1e-9)
    assert score(loaded, val, 64) == b  # bit-identical rerun


def test_tied_weights_survive_the_checkpoint(tmp_path):
    run = RunConfig.model_validate({"tokenizer": "t", "model": {**TINY["gpt"], "tie_weights": True}})
    model = build_model(run.model, V)
    checkpoint.save(model, run, V, tmp_path)
    loaded, _, _ = checkpoint.load(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_checkpoint_that_does_not_match_its_config_is_rejected(tmp_path):
    run = run_cfg("gpt")
    checkpoint.save(build_model(run.model, V), run, V, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["run"]["model"]["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="does not match its config.json"):
        checkpoint.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path)


def test_metrics_definitions():
    m = metrics(total_nats=100.0, tokens=50, characters=200)
    assert m["loss"] == 2.0 and m["ppl"] == pytest.approx(math.exp(2)) and m["bpc"] == pytest.approx(100 / (math.log(2) * 200))


def test_generate_is_seeded_and_respects_top_k():
    model = build_model(run_cfg("gpt").model, V).eval()
    start = torch.zeros(2, 1, dtype=torch.long)
    out1 = generate(model, start, 20, top_k=1, generator=torch.Generator().manual_seed(0))
    out2 = generate(model, start, 20, top_k=1, generator=torch.Generator().manual_seed(99))
    assert torch.equal(out1, out2)  # top_k=1 is greedy: the seed cannot matter
    s1 = generate(model, start, 20, generator=torch.Generator().manual_seed(3))
    s2 = generate(model, start, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.shape == (2, 21)
