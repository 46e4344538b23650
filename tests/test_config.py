"""params.yaml validation: every problem is reported, one line each, naming key, value and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def problems(data) -> list[str]:
    with pytest.raises(ParamsError) as e:
        parse_params(data)
    return e.value.problems


def test_default_params_and_presets_are_valid():
    for path in [ROOT / "params.yaml", *sorted((ROOT / "presets").glob("*.yaml"))]:
        load_params(path)


def test_every_problem_is_reported_with_its_key_path(good):
    d = copy.deepcopy(good)
    d["corpora"]["names"]["split"]["train"] = 0.7
    d["corpora"]["names"]["sha256"] = "abc"
    d["corpora"]["oz"]["spelt"] = 1
    d["tokenizers"]["oz-bpe512"]["vocab_size"] = 100
    got = problems(d)
    assert len(got) == 4, got
    joined = "\n".join(got)
    assert "corpora.names.split: train + val + test must sum to 1, got 0.9" in joined
    assert "corpora.names.sha256: got 'abc'" in joined
    assert (
        "corpora.oz.spelt: unknown key 'spelt'; check the spelling against the documented keys (lm/config.py)" in joined
    )
    assert "tokenizers.oz-bpe512.vocab_size: got 100; input should be greater than or equal to 257" in joined


def test_model_errors_name_the_field_not_the_union_tag(good):
    d = copy.deepcopy(good)
    d["runs"] = {
        "a": {"tokenizer": "names-char", "model": {"family": "gpt", "n_embd": 30, "n_head": 4}},
        "b": {"tokenizer": "names-char", "model": {"family": "mlp", "n_layr": 2}},
        "c": {"tokenizer": "names-char", "model": {"family": "transformer"}},
        "d": {"tokenizer": "names-char", "model": {"family": "wavenet", "block_size": 6}},
    }
    got = "\n".join(problems(d))
    assert "runs.a.model: n_embd (30) must be divisible by n_head (4)" in got
    assert (
        "runs.b.model.n_layr: unknown key 'n_layr'; check the spelling against the documented keys (lm/families.py)"
        in got
    )
    assert "runs.c.model.family: got 'transformer'; must be one of bigram_counts" in got
    assert "runs.d.model.block_size: got 6; must be a power of two" in got


def test_cross_references(good):
    d = copy.deepcopy(good)
    d["tokenizers"]["x"] = {"corpus": "wiki", "kind": "char"}
    d["runs"] = {"r": {"tokenizer": "nope", "model": {"family": "bigram_nn"}}}
    got = problems(d)
    want = "tokenizers.x.corpus: got 'wiki'; must be one of ['names', 'oz', 'shakespeare', 'sms']"
    assert any(p.startswith(want) for p in got)
    d["tokenizers"].pop("x")
    assert any(p.startswith("runs.r.tokenizer: got 'nope'; must be one of") for p in problems(d))


@pytest.mark.parametrize(
    "train, message",
    [
        ({"lr": 0}, "runs.r.train.lr: got 0; input should be greater than 0"),
        ({"batch_size": 0}, "runs.r.train.batch_size: got 0; input should be greater than or equal to 1"),
        ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr (0.01) must not exceed lr (0.001)"),
        ({"max_steps": 0}, "family 'bigram_nn' is trained by gradient descent"),
        ({"schedule": "linear"}, "runs.r.train.schedule: got 'linear'; input should be 'cosine', 'step' or 'constant'"),
    ],
)
def test_training_ranges(good, train, message):
    d = copy.deepcopy(good)
    d["runs"] = {"r": {"tokenizer": "names-char", "model": {"family": "bigram_nn"}, "train": train}}
    assert message in "\n".join(problems(d))


def test_names_must_be_usable_as_stage_keys(good):
    d = copy.deepcopy(good)
    d["runs"] = {"My Run": {"tokenizer": "names-char", "model": {"family": "bigram_nn"}}}
    assert "must match" in problems(d)[0]


def test_a_name_too_long_for_a_file_name_is_refused_up_front(good):
    """A 250-character run name used to pass and then fail in training with `File name too long`."""
    d = copy.deepcopy(good)
    d["runs"]["r" * 250] = {"tokenizer": "names-char", "model": {"family": "bigram_nn"}}
    (problem,) = problems(d)
    assert "at most 64 characters" in problem and len(problem) < 300
    del d["runs"]["r" * 250]
    d["runs"]["r" * 64] = {"tokenizer": "names-char", "model": {"family": "bigram_nn"}}
    assert "r" * 64 in parse_params(d).runs


@pytest.mark.parametrize(
    "text, message",
    [
        ("corpora: {}\ncorpora: {}\ntokenizers: {}\n", "duplicate key 'corpora' (line 2)"),
        ("corpora: [\n", "invalid YAML"),
        ("- 1\n- 2\n", "<top level>: got list; must be a mapping"),
        ("tokenizers: {}\n", "corpora: missing; this key is required"),
    ],
)
def test_unreadable_files(tmp_path, text, message):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert message in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_cli_fails_fast_naming_the_key(tmp_path, good):
    d = copy.deepcopy(good)
    d["corpora"]["shakespeare"]["format"] = "prose"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "lm.cli", "check-params", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "corpora.shakespeare.format: got 'prose'; input should be 'lines', 'text' or 'labelled'" in r.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "lm.cli", "check-params", str(ROOT / "params.yaml")], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "ok" in ok.stdout


def test_validation_never_imports_torch():
    """Stages validate params before importing anything heavy, so a broken file fails in well under a second."""
    code = "import sys, lm.config, lm.cli; lm.config.load_params(sys.argv[1]); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code, str(ROOT / "params.yaml")], check=True)


@pytest.mark.parametrize("family", [[], {"a": 1}])
def test_a_family_that_is_not_a_name_is_one_params_error(family, good):
    """Found by the fuzzer: an unhashable family (a YAML list or mapping) is a problem line, not a TypeError."""
    d = copy.deepcopy(good)
    d["runs"]["names-wavenet"]["model"]["family"] = family
    with pytest.raises(ParamsError, match=r"runs.names-wavenet.model.family: must be one of bigram_counts"):
        parse_params(d, "p")
