"""Sampling: the KV cache (same tokens as without it, for every attention family, greedy and
sampled, past block_size under both overflow policies), top-k / top-p / temperature checks,
streaming byte-level BPE text, and `lm sample` on tiny runs trained here in a tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lm.cli import main
from lm.config import TokenizerConfig
from lm.generate import TextStream, check_sampling, generate, sample_next, stream
from lm.models import build_model
from lm.models.kv_cache import KVCache

from tiny import ATTENTION, train_tiny

V = 11
pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ATTENTION[name], V).eval()


# ----------------------------------------------------------------------------------------------
# the cache itself


@pytest.mark.parametrize("name", list(ATTENTION))
def test_incremental_forward_matches_full_forward(name):
    model = make(name)
    x = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(1))
    full, _ = model(x)
    cache = model.new_cache(3)
    chunks = [x[:, :3], x[:, 3:4], x[:, 4:7], x[:, 7:]]  # prefill, one token, several at once, one
    inc = torch.cat([model(c, cache=cache)[0] for c in chunks], dim=1)
    assert cache.length == 8
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-5)


def test_cache_rejects_overflow_and_reset_reuses_it():
    model = make("gpt")
    cache = model.new_cache(1)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8 positions.*exceed block_size 8"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    cache.reset()
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert logits.shape == (1, 1, V) and cache.length == 1


def test_forward_contract_without_cache_is_unchanged():
    model = make("gpt")
    x = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    logits, loss = model(x, x)
    assert logits.shape == (2, 8, V) and loss.ndim == 0
    assert isinstance(model.new_cache(2), KVCache)
    assert model.kv_cache


# ----------------------------------------------------------------------------------------------
# cached and uncached generation draw the same tokens


@pytest.mark.parametrize("overflow", ["slide", "refill"])
@pytest.mark.parametrize("name", list(ATTENTION))
def test_cached_and_uncached_generation_agree(name, overflow):
    model = make(name)
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(3))
    for kw in ({"top_k": 1}, {"temperature": 1.3}, {"top_k": 4, "top_p": 0.9}):  # greedy, sampled, filtered
        # 21 new tokens on a block_size of 8: the window overflows several times
        runs = [
            generate(
                model, prompt, 21, generator=torch.Generator().manual_seed(7), use_cache=c, overflow=overflow, **kw
            )
            for c in (True, False)
        ]
        assert runs[0].shape == (2, 24)
        assert torch.equal(runs[0], runs[1]), kw


def test_slide_without_cache_is_the_plain_cropping_loop():
    """overflow='slide' is nanoGPT's loop: every step sees the last block_size tokens."""
    model = make("gpt")
    idx = torch.zeros(1, 1, dtype=torch.long)
    ours = generate(model, idx, 20, generator=torch.Generator().manual_seed(5), use_cache=True)
    g = torch.Generator().manual_seed(5)
    ref = idx
    for _ in range(20):
        logits, _ = model(ref[:, -model.block_size :])
        probs = torch.softmax(logits[:, -1, :].float(), dim=-1)
        ref = torch.cat([ref, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert torch.equal(ours, ref)


def test_refill_restarts_the_window_from_half_a_block():
    model = make("gpt")
    seen = []
    real_forward = model.forward

    def spy(idx, targets=None, *, cache=None):
        seen.append((idx.size(1), None if cache is None else cache.length))
        return real_forward(idx, targets, cache=cache)

    model.forward = spy
    list(stream(model, torch.zeros(1, 1, dtype=torch.long), 12, use_cache=True, overflow="refill"))
    # prefill 1, then one token per step until 8 are cached, then a refill of the last 4, ...
    assert seen == [(1, 0)] + [(1, n) for n in range(1, 8)] + [(4, 0)] + [(1, n) for n in range(4, 7)]
    seen.clear()
    list(stream(model, torch.zeros(1, 1, dtype=torch.long), 10, use_cache=False, overflow="refill"))
    assert [t for t, _ in seen] == [1, 2, 3, 4, 5, 6, 7, 8, 4, 5]


def test_families_without_cache_still_generate():
    from lm.families import MLPConfig

    model = build_model(MLPConfig(family="mlp", block_size=3, n_embd=4, n_hidden=8), V).eval()
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 10, overflow="refill")  # refill does not apply
    assert out.shape == (1, 11)
    with pytest.raises(ValueError, match="no KV cache"):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 2, use_cache=True)


# ----------------------------------------------------------------------------------------------
# sampling settings


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"temperature": -1}, "temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_p": 0}, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(**{"temperature": 1.0, "top_k": None, "top_p": None, **kw})
    with pytest.raises(ValueError, match=match):
        generate(make("gpt"), torch.zeros(1, 1, dtype=torch.long), 1, **kw)


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])  # probs ~ .64 .24 .09 .03 .01
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {int(sample_next(logits, generator=g, **kw)) for _ in range(300)}  # noqa: E731
    assert draw(top_k=1) == {0}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.5) == {0}  # the most likely token alone reaches 0.5
    assert draw(top_p=0.8) == {0, 1}  # .64 < .8 <= .64 + .24
    assert draw(top_p=1.0) == {0, 1, 2, 3, 4}


# ----------------------------------------------------------------------------------------------
# streaming text


def test_text_stream_holds_back_partial_utf8():
    from lm.tokenizer import train_tokenizer

    text = "Ünïcödé — “quotes” and € signs, ☃ snowmen. " * 20
    tok = train_tokenizer(TokenizerConfig(corpus="c", kind="bpe", vocab_size=260), {"train": [text]}, "text")
    ids = tok.encode("Zwölf Boxkämpfer jagen Viktor ☃ € “quer”", add_special_tokens=False).ids
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "the test needs tokens that are part of a UTF-8 character"
    s = TextStream(tok)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == "Zwölf Boxkämpfer jagen Viktor ☃ € “quer”"
    assert not any("\ufffd" in p for p in pieces)


# ----------------------------------------------------------------------------------------------
# `lm sample` on runs trained here


def _train(root: Path, name: str, corpus_text: list[str], fmt: str, tok_cfg: dict, model: dict) -> None:
    """A 30-step run of `model` on a 90/10 split of the names, or on 20,000 + 4,000 characters of the text."""
    cut = int(len(corpus_text) * 0.9) if fmt == "lines" else None
    splits = (
        {"train": corpus_text[:cut], "val": corpus_text[cut:]}
        if fmt == "lines"
        else {"train": [corpus_text[0][:20000]], "val": [corpus_text[0][20000:24000]]}
    )
    train_tiny(root, name, splits, fmt, tok_cfg, model, max_steps=30, batch_size=16, eval_interval=30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mirror: Path) -> Path:
    """Four tiny runs (30 steps each) in a tmp folder laid out as the pipeline's models/ and tokenizers/."""
    root = tmp_path_factory.mktemp("runs")
    shakespeare = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[:24000]
    names = [n for n in (mirror / "names.txt").read_text().split() if len(n) <= 10][:2000]
    gpt = {"family": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    _train(root, "char-gpt", [shakespeare], "text", {"kind": "char"}, gpt)
    _train(root, "bpe-gpt", [shakespeare], "text", {"kind": "bpe", "vocab_size": 300}, gpt)
    _train(root, "names-gpt", names, "lines", {"kind": "char"}, gpt)
    _train(
        root,
        "char-mlp",
        [shakespeare],
        "text",
        {"kind": "char"},
        {"family": "mlp", "block_size": 3, "n_embd": 4, "n_hidden": 16},
    )
    return root


def where(runs: Path) -> list[str]:
    """`lm sample`'s arguments that point at the tiny runs (and at a params file that does not exist)."""
    return ["--models-dir", str(runs / "models"), "--tokenizers-dir", str(runs / "tokenizers"), "--params",
            str(runs / "absent.yaml")]  # fmt: skip


def lm_sample(runs: Path, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["sample", *args, *where(runs)])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_streams_seeded_text(runs, capsys):
    code, out, err = lm_sample(runs, capsys, "char-gpt", "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "3")
    assert code == 0 and out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 60 + 1  # char: one char per token
    assert "60 tokens" in err and "KV cache" in err
    assert lm_sample(runs, capsys, "char-gpt", "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "3")[1] == out
    assert (
        lm_sample(
            runs, capsys, "char-gpt", "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "3", "--no-cache"
        )[1]
        == out
    )  # the cache changes the speed, not the text
    assert lm_sample(runs, capsys, "char-gpt", "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "4")[1] != out


def test_sample_options(runs, capsys):
    code, out, _ = lm_sample(
        runs,
        capsys,
        "bpe-gpt",
        "--max-new-tokens",
        "40",
        "--num-samples",
        "2",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--temperature",
        "0.8",
        "--overflow",
        "refill",
    )
    assert code == 0 and out.count("-" * 72) == 1
    code, out, _ = lm_sample(runs, capsys, "char-mlp", "--prompt", "To be", "--max-new-tokens", "20")
    assert code == 0 and out.startswith("To be")


def test_sample_names_stop_at_the_boundary(runs, capsys):
    code, out, _ = lm_sample(
        runs, capsys, "names-gpt", "--prompt", "em", "--num-samples", "5", "--max-new-tokens", "30"
    )
    lines = out.splitlines()
    assert code == 0 and len(lines) == 5
    assert all(line.startswith("em") and "." not in line for line in lines)


def test_sample_errors_name_the_problem(runs, capsys):
    code, _, err = lm_sample(runs, capsys, "char-gpt", "--prompt", "héllo ☃")
    assert code == 2 and "outside the char-gpt-tok vocabulary: 'é', '☃'" in err
    code, _, err = lm_sample(runs, capsys, "nope")
    assert code == 2 and "unknown run 'nope'" in err and "available runs: bpe-gpt, char-gpt, char-mlp, names-gpt" in err
    for args, msg in [
        (["--temperature", "0"], "--temperature: must be a finite number > 0"),
        (["--temperature", "inf"], "--temperature: must be a finite number > 0"),
        (["--top-k", "0"], "--top-k: must be >= 1"),
        (["--top-p", "0"], "--top-p: must lie in (0, 1]"),
        (["--top-p", "1.01"], "--top-p: must lie in (0, 1]"),
    ]:
        with pytest.raises(SystemExit) as e:
            lm_sample(runs, capsys, "char-gpt", *args)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_sample_says_when_the_checkpoint_was_trained_with_other_params(runs, capsys):
    """params.yaml edited since the run was trained: the sample still comes from the trained model, and says so."""
    from lm import checkpoint

    trained = checkpoint.load(runs / "models" / "char-gpt")[1].model_dump(mode="json")
    edited = json.loads(json.dumps(trained))
    edited["model"]["n_embd"], edited["train"]["lr"] = 32, 0.01
    params = {"corpora": {}, "tokenizers": {}, "runs": {"char-gpt": edited}}
    params["tokenizers"]["char-gpt-tok"] = {"corpus": "c", "kind": "char"}
    params["corpora"]["c"] = {"url": "http://x/c.txt", "sha256": "0" * 64, "filename": "c.txt", "format": "text",
                              "split": {"train": 0.9, "val": 0.1}}  # fmt: skip
    (runs / "edited.yaml").write_text(yaml.safe_dump(params))
    dirs = ["--models-dir", str(runs / "models"), "--tokenizers-dir", str(runs / "tokenizers")]
    code = main(["sample", "char-gpt", "--max-new-tokens", "5", *dirs, "--params", str(runs / "edited.yaml")])
    err = capsys.readouterr().err
    assert code == 0
    assert (
        f"note: {runs / 'models' / 'char-gpt'} was trained with other settings than runs.char-gpt in "
        f"{runs / 'edited.yaml'} now has (model.n_embd 16 → 32; train.lr 0.003 → 0.01): sampling the trained "
        "model; `dvc repro` retrains it" in err
    )
    (runs / "edited.yaml").write_text(yaml.safe_dump({**params, "runs": {"char-gpt": trained}}))
    assert main(["sample", "char-gpt", "--max-new-tokens", "5", *dirs, "--params", str(runs / "edited.yaml")]) == 0
    assert "note:" not in capsys.readouterr().err  # the same settings: nothing to say
    # train.dtype: auto in the params, the resolved dtype in the checkpoint: the same settings too.
    assert trained["train"]["dtype"] in ("float32", "bfloat16")
    (runs / "edited.yaml").write_text(yaml.safe_dump({**params, "runs": {"char-gpt": trained | {
        "train": trained["train"] | {"dtype": "auto"}}}}))  # fmt: skip
    assert main(["sample", "char-gpt", "--max-new-tokens", "5", *dirs, "--params", str(runs / "edited.yaml")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_ctrl_c_while_sampling_keeps_the_text_and_ends_in_one_line(runs):
    """Ctrl-C during `lm sample --max-new-tokens 1000000000` ended in a 49-line KeyboardInterrupt traceback: the
    text drawn so far stays on stdout (ended with a newline), stderr is one summary line, the exit code 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "lm.cli", "sample", "char-gpt", "--max-new-tokens", "1000000000", *where(runs)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    first = proc.stdout.read(50)  # streamed: 50 characters are out before the sampling ends
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(first) == 50 and (first + out).endswith("\n") and len(first + out) > 50
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("[interrupted: "), err
