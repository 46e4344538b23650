"""Model selection (train.keep), the device settings (compile/AdamW 'auto', evaluate on the run's device) and
makemore's names batches for fixed-context families."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lm import batches as B
from lm.config import RunConfig
from lm.models import IGNORE_INDEX, build_model
from lm.trainer import adamw_impl, compiles, fit

V = 13
RNG = np.random.default_rng(0)
STREAM = np.cumsum(RNG.choice([1, 1, 1, 2], size=4000)) % V
TRAIN, VAL = STREAM[:60], STREAM[3000:]  # 60 training tokens: memorised within a few dozen steps
OVERFIT = {
    "tokenizer": "t",
    "model": {"family": "gpt", "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.1},
    "train": {"batch_size": 8, "lr": 1e-2, "max_steps": 120, "eval_interval": 20, "eval_batches": 4, "grad_clip": 0},
}


def overfit_run(**train) -> RunConfig:
    return RunConfig.model_validate(OVERFIT | {"train": OVERFIT["train"] | train})


def fit_overfit(run: RunConfig, state_dir=None, on_eval=None, fingerprint=None):
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, V)
    b = lambda ids: B.for_model(run.model, ids, "text", 0)  # noqa: E731
    result = fit(
        model, b(TRAIN), b(VAL), run.train, device=torch.device("cpu"), progress=False,
        state_dir=state_dir, fingerprint=fingerprint, on_eval=on_eval,
    )  # fmt: skip
    return model, result


def test_keep_best_returns_the_weights_of_the_best_evaluation_not_the_last():
    seen: dict[int, dict] = {}
    model = None

    def snapshot(row):  # the model's weights as they were at each evaluation
        seen[row["step"]] = copy.deepcopy(model.state_dict())

    run = overfit_run()
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, V)
    b = lambda ids: B.for_model(run.model, ids, "text", 0)  # noqa: E731
    result = fit(model, b(TRAIN), b(VAL), run.train, device=torch.device("cpu"), progress=False, on_eval=snapshot)

    vals = {r["step"]: r["val_loss"] for r in result.curve}
    best = min(vals, key=vals.get)
    assert best < 120 and vals[120] > vals[best] + 0.05, f"the run must overfit for this test to mean anything: {vals}"
    assert result.selected_step == best
    assert len(result.curve) == 6  # the curve keeps every evaluation
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, seen[best][name]), name
    assert not torch.equal(model.state_dict()["lm_head.weight"], seen[120]["lm_head.weight"])


def test_keep_last_returns_the_last_weights():
    best_model, best = fit_overfit(overfit_run())
    last_model, last = fit_overfit(overfit_run(keep="last"))
    assert best.curve == last.curve  # selection does not change training
    assert last.selected_step == 120 and best.selected_step < 120
    assert not torch.equal(best_model.lm_head.weight, last_model.lm_head.weight)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [40, 100])  # before and after the best step has been seen
def test_resume_with_keep_best_is_bit_identical(tmp_path, crash_at):
    run = overfit_run(checkpoint_interval=20)
    ref_model, ref = fit_overfit(run)
    fp = {"config": "c", "tokens": "t", "code": {}}

    def crash(row):
        if row["step"] == crash_at:
            raise Crash

    state = tmp_path / ".m.resume"
    with pytest.raises(Crash):
        fit_overfit(run, state, on_eval=crash, fingerprint=fp)
    saved = json.loads((state / "state.json").read_text())
    assert saved["step"] == crash_at - 20 and saved["progress"]["best_step"] is not None
    model, result = fit_overfit(run, state, fingerprint=fp)
    assert result.curve == ref.curve and result.selected_step == ref.selected_step
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_train_json_records_the_selected_step(tmp_path):
    from lm.train_run import train_run

    tok = _tokenized(tmp_path, STREAM[:60], STREAM[3000:3400])
    run = RunConfig.model_validate(OVERFIT | {"train": OVERFIT["train"] | {"max_steps": 200}})
    info = train_run("r", run, tok, tmp_path / "m", tmp_path / "c.csv", progress=False)
    saved = json.loads((tmp_path / "m" / "train.json").read_text())
    rows = {int(line.split(",")[0]): float(line.split(",")[3]) for line in (tmp_path / "c.csv").read_text().split()[1:]}
    assert saved["keep"] == "best" and saved["selected_step"] == min(rows, key=rows.get) == info["selected_step"]
    assert saved["val_loss"] == pytest.approx(rows[saved["selected_step"]], abs=1e-12)


def _tokenized(tmp_path, train: np.ndarray, val: np.ndarray):
    """A char-tokenized text corpus whose 13 letters stand for the 13 ids of STREAM."""
    from lm.config import TokenizerConfig
    from lm.tokenizer import tokenize_corpus

    text = lambda ids: "".join(chr(97 + int(t)) for t in ids)  # noqa: E731
    tok = tmp_path / "tok"
    tokenize_corpus(TokenizerConfig(corpus="c", kind="char"), {"train": [text(train)], "val": [text(val)]}, "text", tok)
    return tok


# -- devices --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cuda", True),
        ("auto", "cpu", False),
        ("auto", "mps", False),
        (True, "cpu", True),
        (False, "cuda", False),
    ],
)
def test_compile_auto_resolves_per_device(setting, device, expected):
    cfg = overfit_run(compile=setting).train
    assert compiles(cfg, torch.device(device)) is expected


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cuda", "fused"),
        ("auto", "cpu", "foreach"),
        ("for-loop", "cuda", "for-loop"),
        ("fused", "cpu", "fused"),
    ],
)
def test_adamw_auto_is_fused_on_cuda_only(setting, device, expected):
    assert adamw_impl(overfit_run(adamw_impl=setting).train, device) == expected


def test_evaluate_runs_on_the_runs_device(tmp_path, monkeypatch):
    """evaluate_run computes where the run's train.device says (the stage passes no device): the setting
    reaches pick_device, and every forward pass gets its tensors on the device it picked."""
    import lm.evaluate as E
    from lm import checkpoint
    from lm.config import EvaluateConfig

    tok = _tokenized(tmp_path, STREAM[:500], STREAM[3000:3100])
    run = RunConfig.model_validate(OVERFIT | {"train": OVERFIT["train"] | {"device": "cpu"}})
    model = build_model(run.model, 13)
    checkpoint.save(model, run, 13, tmp_path / "m")

    asked, seen = [], set()
    real = E.pick_device
    monkeypatch.setattr(E, "pick_device", lambda name: asked.append(name) or real(name))
    forward = type(model).forward

    def spy(self, idx, *a, **k):
        seen.add(idx.device.type)
        return forward(self, idx, *a, **k)

    monkeypatch.setattr(type(model), "forward", spy)
    cfg = EvaluateConfig(num_passages=1, passage_chars=20)
    E.evaluate_run("r", tmp_path / "m", tok, cfg, tmp_path / "m.json", tmp_path / "s.txt", tmp_path / "i.safetensors")
    assert asked == ["cpu"] and seen == {"cpu"}
    asked.clear()
    E.evaluate_run(
        "r",
        tmp_path / "m",
        tok,
        cfg,
        tmp_path / "m.json",
        tmp_path / "s.txt",
        tmp_path / "i.safetensors",
        device="auto",
    )
    assert asked == ["auto"]
    if not torch.cuda.is_available():
        bad = run.model_copy(update={"train": run.train.model_copy(update={"device": "cuda"})})
        checkpoint.save(model, bad, 13, tmp_path / "m")
        with pytest.raises(RuntimeError, match="train.device is 'cuda' but no CUDA device"):
            E.evaluate_run(
                "r", tmp_path / "m", tok, cfg, tmp_path / "m.json", tmp_path / "s.txt", tmp_path / "i.safetensors"
            )


# -- names batches ----------------------------------------------------------------------------------

NAMES = np.concatenate([[0]] + [np.r_[RNG.integers(1, V, RNG.integers(2, 9)), 0] for _ in range(400)])
FIXED = {"family": "mlp", "block_size": 3, "n_embd": 4, "n_hidden": 16, "batchnorm": True}


def _contexts(ids: np.ndarray, k: int) -> list[tuple[tuple[int, ...], int]]:
    """Every (context, target) pair of a '.a.b.' stream, computed plainly as makemore builds its dataset."""
    pairs, ctx = [], [0] * k
    for t in ids[1:]:
        pairs.append((tuple(ctx), int(t)))
        ctx = [0] * k if t == 0 else ctx[1:] + [int(t)]
    return pairs


def test_names_batches_for_fixed_context_families_are_uniform_examples():
    cfg = RunConfig.model_validate({"tokenizer": "t", "model": FIXED}).model
    b = B.for_model(cfg, NAMES, "lines", 0)
    x, y = b.sample(np.random.default_rng(0), 32)
    assert x.shape == (32, 3) and y.shape == (32, 3)
    assert (y[:, :-1] == IGNORE_INDEX).all() and (y[:, -1] != IGNORE_INDEX).all()  # 32 examples, one target each
    pairs = _contexts(NAMES, 3)
    assert sorted(zip(map(tuple, b._ex_x.tolist()), b._ex_y.tolist())) == sorted(pairs)  # all of them, each once
    # Uniform over positions: the long names' late positions are drawn as often as any other pair.
    xs, ys = b.sample(np.random.default_rng(1), 200_000)
    counts = np.bincount(ys[:, -1].numpy(), minlength=V) / 200_000
    expected = np.bincount([t for _, t in pairs], minlength=V) / len(pairs)
    assert np.abs(counts - expected).max() < 0.01
    # Attention families still get whole names.
    gpt = RunConfig.model_validate({"tokenizer": "t", "model": {"family": "gpt", "block_size": 16, "n_layer": 1,
                                                                "n_head": 1, "n_embd": 8}}).model  # fmt: skip
    xg, _ = B.for_model(gpt, NAMES, "lines", 0).sample(np.random.default_rng(0), 4)
    assert xg.shape[0] == 4 and xg.shape[1] > 3


@pytest.mark.parametrize("family", ["mlp", "wavenet"])
def test_batchnorm_sees_only_the_examples(family):
    """In training, BatchNorm's batch statistics are those of the rows with a target: padding after a name
    (target -1) changes neither the loss nor the running statistics."""
    model_cfg = {"mlp": FIXED, "wavenet": {"family": "wavenet", "block_size": 4, "n_embd": 4, "n_hidden": 16}}[family]
    cfg = RunConfig.model_validate({"tokenizer": "t", "model": model_cfg}).model
    torch.manual_seed(0)
    a = build_model(cfg, V).train()
    b_ = copy.deepcopy(a)
    x = torch.randint(0, V, (6, 5))
    y = torch.randint(0, V, (6, 5))
    y[:, 3:] = IGNORE_INDEX
    x_padded = x.clone()
    x_padded[:, 3:] = 0  # what sits after a name's end
    _, la = a(x, y)
    _, lb = b_(x_padded, y)
    assert torch.equal(la, lb)
    for (n, ta), (_, tb) in zip(a.named_buffers(), b_.named_buffers()):
        assert torch.equal(ta, tb), n
    la.backward()
    assert all(p.grad is not None for p in a.parameters())


def test_names_fixed_context_training_counts_examples():
    run = RunConfig.model_validate(
        {"tokenizer": "t", "model": FIXED, "train": {"batch_size": 32, "max_steps": 20, "eval_interval": 10}}
    )
    torch.manual_seed(0)
    model = build_model(run.model, V)
    b = B.for_model(run.model, NAMES, "lines", 0)
    result = fit(model, b, b, run.train, device=torch.device("cpu"), progress=False)
    assert result.tokens == 20 * 32  # 32 (context, target) examples a step, as makemore's batch of 32
