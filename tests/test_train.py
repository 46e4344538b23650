"""The training loop, checkpoints and evaluation, on synthetic token streams (no pipeline needed)."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch

from lm import checkpoint
from lm.batches import for_model
from lm.config import RunConfig, TrainConfig
from lm.generate import generate
from lm.metrics import metrics, score
from lm.models import build_model
from lm.trainer import DivergedError, fit, lr_at

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
    return RunConfig.model_validate(
        {"tokenizer": "t", "model": TINY[family], "train": {"batch_size": 8, "lr": 3e-3, **steps, **train}}
    )


def train_once(run: RunConfig, data=STREAM, fmt="text"):
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, V)
    b = lambda ids: for_model(run.model, ids, fmt, 0)  # noqa: E731
    result = fit(
        model,
        b(data[:3000] if fmt == "text" else data),
        b(data[3000:] if fmt == "text" else data),
        run.train,
        device=torch.device("cpu"),
        progress=False,
    )
    return model, result


@pytest.mark.parametrize("family", list(TINY))
def test_same_seed_same_curve_and_weights(family):
    run = run_cfg(family)
    m1, r1 = train_once(run)
    m2, r2 = train_once(run)
    assert r1.curve == r2.curve
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
    a, b = score(model.eval(), val.iterate(7)), score(loaded, val.iterate(64))
    assert a[1] == b[1] == len(STREAM[3000:]) - 1  # every token but the first, whatever the batch size
    assert a[0] == pytest.approx(b[0], rel=1e-9)
    assert score(loaded, val.iterate(64)) == b  # bit-identical rerun


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
    assert (
        m["loss"] == 2.0
        and m["ppl"] == pytest.approx(math.exp(2))
        and m["bpc"] == pytest.approx(100 / (math.log(2) * 200))
    )


def test_generate_is_seeded_and_respects_top_k():
    model = build_model(run_cfg("gpt").model, V).eval()
    start = torch.zeros(2, 1, dtype=torch.long)
    out1 = generate(model, start, 20, top_k=1, generator=torch.Generator().manual_seed(0))
    out2 = generate(model, start, 20, top_k=1, generator=torch.Generator().manual_seed(99))
    assert torch.equal(out1, out2)  # top_k=1 is greedy: the seed cannot matter
    s1 = generate(model, start, 20, generator=torch.Generator().manual_seed(3))
    s2 = generate(model, start, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.shape == (2, 21)


# ----------------------------------------------------------------------------------------------
# Resumable training (in process; tests/test_resume.py kills real stage processes)


class Crash(Exception):
    pass


FP = {"config": "c", "tokens": "t", "code": {"lm/trainer.py": "1"}}


def _fit(run: RunConfig, state_dir, fingerprint=FP, on_eval=None):
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, V)
    b = lambda ids: for_model(run.model, ids, "text", 0)  # noqa: E731
    result = fit(
        model,
        b(STREAM[:3000]),
        b(STREAM[3000:]),
        run.train,
        device=torch.device("cpu"),
        progress=False,
        state_dir=state_dir,
        fingerprint=fingerprint,
        on_eval=on_eval,
    )
    return model, result


@pytest.mark.parametrize("family", [f for f in TINY if f != "bigram_counts"])
def test_resume_after_a_crash_is_bit_identical(family, tmp_path):
    # Dropout on where the family has it, so the torch RNG state must be restored too.
    run = run_cfg(family, checkpoint_interval=10, max_steps=40)
    if family == "gpt":
        run = run.model_copy(update={"model": run.model.model_copy(update={"dropout": 0.2})})
    ref_model, ref = _fit(run, None)

    def crash(row):
        if row["step"] == 30:
            raise Crash

    state = tmp_path / ".m.resume"
    with pytest.raises(Crash):
        _fit(run, state, on_eval=crash)
    assert json.loads((state / "state.json").read_text())["step"] == 20  # saved at 10 and 20; 30 never saved
    model, result = _fit(run, state)
    assert result.curve == ref.curve and result.tokens == ref.tokens
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_state_saved_for_other_params_is_not_resumed(tmp_path, capsys):
    run = run_cfg("mlp", checkpoint_interval=10, max_steps=30)
    state = tmp_path / ".m.resume"
    with pytest.raises(Crash):
        _fit(run, state, on_eval=lambda row: (_ for _ in ()).throw(Crash()) if row["step"] == 20 else None)
    assert state.exists()
    ref_model, ref = _fit(run, None)
    for other, why in [
        ({**FP, "config": "other"}, "it was saved for other params"),
        ({**FP, "tokens": "other"}, "it was saved for other training tokens"),
        ({**FP, "code": {"lm/trainer.py": "2", "lm/batches.py": "3"}}, "it was saved by other code (lm/batches.py, "
         "lm/trainer.py changed since)"),
    ]:  # fmt: skip
        with pytest.raises(Crash):
            _fit(run, state, on_eval=lambda row: (_ for _ in ()).throw(Crash()) if row["step"] == 20 else None)
        model, result = _fit(run, state, fingerprint=other)
        assert f"note: not resuming from {state}: {why}; training from scratch" in capsys.readouterr().err
        assert result.curve == ref.curve


def test_a_damaged_state_is_not_resumed(tmp_path, capsys):
    """Unreadable, or well-formed but not this model's (another shape under the same fingerprint): a note,
    and training from scratch, untouched by the bad state (the result equals a run without one)."""
    run = run_cfg("gpt", checkpoint_interval=10, max_steps=30)
    ref_model, ref = _fit(run, None)
    state = tmp_path / ".m.resume"
    crash = lambda row: (_ for _ in ()).throw(Crash()) if row["step"] == 20 else None  # noqa: E731
    with pytest.raises(Crash):
        _fit(run, state, on_eval=crash)
    (state / "state.safetensors").write_bytes(b"\x80\x04 a pickle, never loaded")
    model, result = _fit(run, state)
    assert re.search(rf"note: not resuming from {re.escape(str(state))}: it is unreadable \(.*\); training from "
                     "scratch", capsys.readouterr().err)  # fmt: skip
    assert result.curve == ref.curve
    with pytest.raises(Crash):
        _fit(run_cfg("mlp", checkpoint_interval=10, max_steps=30), state, on_eval=crash)
    model, result = _fit(run, state)
    assert "its model tensors do not fit this model; training from scratch" in capsys.readouterr().err
    assert result.curve == ref.curve and all(
        torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters())
    )


def test_divergence_names_the_step_and_the_last_good_checkpoint(tmp_path):
    # SGD without clipping, lr warming up to 100: fine for the first checkpoints, then NaN/inf.
    run = run_cfg("gpt", optimizer="sgd", lr=100.0, warmup_steps=60, grad_clip=0.0, max_steps=60, checkpoint_interval=5)
    state = tmp_path / ".m.resume"
    with pytest.raises(DivergedError) as e:
        _fit(run, state)
    saved = json.loads((state / "state.json").read_text())["step"]
    m = re.search(
        r"loss became (nan|inf) at step (\d+) .*the last good checkpoint is (\S+) \(step (\d+)\)", str(e.value)
    )
    assert m, str(e.value)
    assert m[3] == str(state) and int(m[4]) == saved and saved <= int(m[2]) < saved + 5
    checkpoint.read_training_state(state)  # intact and readable


def test_a_config_that_does_not_match_its_weights_is_one_short_line(tmp_path):
    """config.json sizes that disagree with the weights printed a ~3,000-character line with no fix: one line
    naming the first mismatch, checked from the header before any model is built."""
    run = run_cfg("gpt")
    checkpoint.save(build_model(run.model, V), run, V, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    bigger = {**meta, "run": {**meta["run"], "model": {**meta["run"]["model"], "n_embd": 2 * run.model.n_embd}}}
    (tmp_path / "config.json").write_text(json.dumps(bigger))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path} does not match its config.json: ") and msg.endswith(": re-run the train stage")
    assert " more)" in msg and "in model.safetensors but" in msg and len(msg) < 300, msg
    deeper = {**meta, "run": {**meta["run"], "model": {**meta["run"]["model"], "n_layer": run.model.n_layer + 1}}}
    (tmp_path / "config.json").write_text(json.dumps(deeper))
    with pytest.raises(checkpoint.CheckpointError, match=r"is missing.*re-run the train stage"):
        checkpoint.load(tmp_path)


def test_a_checkpoint_past_the_machine_s_memory_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """A crafted config.json used to build 4.7 GB before any check: the header's shapes give the size first."""
    from lm import memory

    run = run_cfg("gpt")
    checkpoint.save(build_model(run.model, V), run, V, tmp_path)
    built = []
    monkeypatch.setattr(memory, "available", lambda: 1000)  # bytes: less than the weights
    monkeypatch.setattr("lm.models.build_model", lambda *a: built.append(a))
    with pytest.raises(checkpoint.CheckpointError, match=r"parameters; loading the checkpoint needs about") as e:
        checkpoint.load(tmp_path)
    assert "machine has 0.0 GB available" in str(e.value) and not built


def test_checkpoint_files_are_safetensors_and_tampering_is_rejected(tmp_path):
    run = run_cfg("gpt")
    checkpoint.save(build_model(run.model, V), run, V, tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()
    # A changed weight byte, a broken header, a truncated file, and a pickle under the safetensors name.
    flipped = good[:-1] + bytes([good[-1] ^ 1])
    for bad, why in [
        (flipped, "has changed since it was saved"),
        (good[:9] + b"\xff" + good[10:], "changed"),
        (good[: len(good) // 2], "changed"),
        (b"\x80\x04\x95" + b"\0" * 64, "changed"),
    ]:
        (tmp_path / "model.safetensors").write_bytes(bad)
        with pytest.raises(checkpoint.CheckpointError, match=why):
            checkpoint.load(tmp_path)
    # Without the recorded hash (an older or hand-made config.json) nothing is read: corrupted weights used to end
    # in a 40-line traceback (`probability tensor contains inf/nan`) when sampled.
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    for weights in (good, flipped):
        (tmp_path / "model.safetensors").write_bytes(weights)
        with pytest.raises(checkpoint.CheckpointError, match="records no sha256 of model.safetensors") as e:
            checkpoint.load(tmp_path)
        assert "re-run the train stage" in str(e.value)
    # A hash that matches broken bytes (a crafted config.json): the header is checked before any model is built.
    for bad in (good[:9] + b"\xff" + good[10:], good[: len(good) // 2], b"\x80\x04\x95" + b"\0" * 64):
        (tmp_path / "model.safetensors").write_bytes(bad)
        (tmp_path / "config.json").write_text(json.dumps({**meta, "sha256": hashlib.sha256(bad).hexdigest()}))
        with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file") as e:
            checkpoint.load(tmp_path)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400
    (tmp_path / "config.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes(good)
    (tmp_path / "config.json").write_text(json.dumps({**meta, "run": {**meta["run"], "model": {"family": "nope"}}}))
    with pytest.raises(checkpoint.CheckpointError, match="not a valid checkpoint config"):
        checkpoint.load(tmp_path)
    (tmp_path / "config.json").write_text("{truncated")
    with pytest.raises(checkpoint.CheckpointError, match="not a valid checkpoint config"):
        checkpoint.load(tmp_path)
    # A tensor removed from the file: missing names are listed.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors.pop(first)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    sha = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    (tmp_path / "config.json").write_text(json.dumps({**meta, "sha256": sha}))
    with pytest.raises(checkpoint.CheckpointError, match=f"{first} .* is missing"):
        checkpoint.load(tmp_path)


def test_no_pickle_anywhere():
    """Nothing in the code base unpickles: no torch.load (outside weights_only=True), no pickle."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("lm/**/*.py"), *root.glob("stages/*.py"), *root.glob("bench/*.py")]:
        text = path.read_text()
        assert "import pickle" not in text, path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m[1], f"{path}: {m[0]}"


@pytest.mark.parametrize("family", ["mlp", "gpt"])
def test_grad_accum_gives_the_same_updates_on_uneven_rows(family):
    """Names rows differ in length (targets padded with -1): each micro-batch's loss is weighted by
    its share of the batch's targets, so 4 micro-batches of 8 make the same step as one batch of 32."""
    cfg = {**TINY[family], "batchnorm": False} if family == "mlp" else TINY[family]
    runs = [
        RunConfig.model_validate(
            {
                "tokenizer": "t",
                "model": cfg,
                "train": {
                    "batch_size": 32,
                    "lr": 3e-3,
                    "max_steps": 20,
                    "eval_interval": 1,
                    "eval_batches": 2,
                    "grad_accum": a,
                },
            }
        )
        for a in (1, 4)
    ]
    (m1, r1), (m4, r4) = (train_once(r, NAMES, "lines") for r in runs)
    for a, b in zip(r1.curve, r4.curve):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m4.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), n
    with pytest.raises(ValueError, match="not divisible by 1 processes x train.grad_accum 3"):
        train_once(
            runs[0].model_copy(update={"train": runs[0].train.model_copy(update={"grad_accum": 3})}), NAMES, "lines"
        )


# ----------------------------------------------------------------------------------------------
# time-to-quality levers: a schedule over elapsed time, batch-size and window-length warm-up


def test_a_time_budget_schedules_the_lr_over_elapsed_seconds():
    """Under time_budget_s the decay follows the seconds spent, not the step: at half the budget the cosine is
    half-way whatever the step, and at the budget it is at min_lr."""
    cfg = TrainConfig(max_steps=10_000, lr=1.0, min_lr=0.1, warmup_steps=10, time_budget_s=20.0)
    assert lr_at(0, cfg, 0.0) == pytest.approx(1 / 11)  # warmup is still counted in steps
    assert lr_at(11, cfg, 10.0) == lr_at(5000, cfg, 10.0) == pytest.approx(0.55)
    assert lr_at(12, cfg, 20.0) == lr_at(12, cfg, 35.0) == pytest.approx(0.1)
    step = TrainConfig(max_steps=10_000, lr=0.1, schedule="step", step_at=[0.5], time_budget_s=8.0)
    assert [lr_at(9000, step, 3.9), lr_at(1, step, 4.0)] == pytest.approx([0.1, 0.01])


def test_a_time_budget_stops_training_when_it_is_spent_and_evaluates_there(monkeypatch):
    """The run stops after the step that spends the budget (max_steps is a ceiling), evaluates there, and the lr of
    its curve falls as the clock runs: a fake clock advancing 1 s per step makes that exact."""
    clock = iter(range(10**6))
    monkeypatch.setattr("lm.trainer.time.perf_counter", lambda: float(next(clock)))
    run = run_cfg("gpt", max_steps=1000, eval_interval=4, warmup_steps=0, min_lr=0.0, time_budget_s=10.0)
    _, r = train_once(run)
    assert r.steps == 10 and sum(r.step_seconds) == pytest.approx(10.0)
    assert [row["step"] for row in r.curve] == [4, 8, 10]
    assert r.curve[-1]["lr"] == pytest.approx(run.train.lr * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_ramp_grows_linearly_to_the_full_value_in_multiples():
    from lm.config import Warmup
    from lm.trainer import ramp

    w = Warmup(start=8, steps=10)
    assert [ramp(w, 32, s) for s in (0, 5, 9, 10, 500)] == [8, 20, 29, 32, 32]
    assert [ramp(w, 64, s, 8) for s in (0, 3, 5, 9)] == [8, 24, 32, 56]  # 8 + 56·s/10, down to a multiple of 8
    assert ramp(Warmup(start=3, steps=4), 32, 0, 4) == 4  # never below one row per micro-batch
    assert ramp(None, 32, 0) == 32


def test_batch_and_window_warmups_train_smaller_batches_first_and_are_reproducible():
    """The first steps see fewer, shorter windows (fewer tokens), the run is the same every time, and after the
    warm-up it trains full batches."""
    run = run_cfg("gpt", batch_warmup={"start": 2, "steps": 10}, seq_warmup={"start": 2, "steps": 10})
    (m1, r1), (m2, r2) = train_once(run), train_once(run)
    assert r1.curve == r2.curve and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(),
                                                                          m2.state_dict().values()))  # fmt: skip
    # steps 0-9: batches and windows of 2, 2, 3, 3, 4, 5, 5, 6, 6, 7 (2 + 6·s/10, rounded down); then 8 x 8
    assert r1.curve[0]["tokens"] == 4 + 4 + 9 + 9 + 16 + 25 + 25 + 36 + 36 + 49
    assert r1.tokens == r1.curve[0]["tokens"] + 20 * 8 * 8
    _, plain = train_once(run_cfg("gpt"))
    assert plain.tokens == 30 * 8 * 8


def test_warmups_that_cannot_apply_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"batch_warmup.start \(64\) must not exceed batch_size \(8\)"):
        run_cfg("gpt", batch_warmup={"start": 64, "steps": 10})
    with pytest.raises(ValueError, match=r"seq_warmup.start \(16\) must not exceed model.block_size \(8\)"):
        run_cfg("gpt", seq_warmup={"start": 16, "steps": 10})
    with pytest.raises(ValueError, match="this run's batches have none .* remove seq_warmup"):
        train_once(run_cfg("gpt", seq_warmup={"start": 2, "steps": 10}), NAMES, "lines")
    with pytest.raises(ValueError, match="this run's batches have none .* remove seq_warmup"):
        train_once(run_cfg("mlp", seq_warmup={"start": 2, "steps": 10}))


def test_a_time_budget_is_refused_under_torchrun(monkeypatch):
    """Each process's clock would set its own lr and last step, and the replicas would part: refused at the start."""
    monkeypatch.setattr("lm.trainer.distributed.world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"one process's clock; under torchrun \(2 processes\) use max_steps"):
        train_once(run_cfg("gpt", time_budget_s=5.0))
