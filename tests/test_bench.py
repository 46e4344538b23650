"""The benchmarks' own logic, not their speed (timings are figures, never asserted).

* The race must give the study the most steps that fit the reference's wall-clock on a machine
  whose speed drifts: `fit_to_budget` against simulated clocks, and the report's caveat.
* The bf16 throttling warning, from given peaks and CPU flags.
* `bench.generate` end to end on a few tokens: every column, and the cache draws the same tokens.
* `bench.makemore_bn`, the BatchNorm anchor's reference: the study's split, the lecture's example counts, ln V at
  the start, learning, bit-identical reruns. `bench.makemore_transformer`: makemore's split, rows, parameter count
  and kept step. Both: a missing names.txt is a usage error naming the fix.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from bench.train_speed import fit_to_budget


def clock(seconds_per_step):
    """A fake `train(steps)`: records the step counts it was asked for, 'spends' a simulated time."""
    calls = []

    def train(steps: int):
        calls.append(steps)
        return seconds_per_step(steps, len(calls)) * steps, f"run{len(calls)}"

    return train, calls


def test_a_good_guess_is_accepted_as_is():
    train, calls = clock(lambda n, k: 0.05)
    assert fit_to_budget(train, budget=100.0, guess=1990.7) == (1990, pytest.approx(99.5), "run1")
    assert calls == [1990]


@pytest.mark.parametrize("guess", [2400, 1500])
def test_a_wrong_guess_is_rescaled_into_the_window(guess):
    # Over the budget (2400 * 0.05 = 120 s) or well under it (75 s): one re-run lands in 95-102%.
    train, calls = clock(lambda n, k: 0.05)
    steps, spent, result = fit_to_budget(train, budget=100.0, guess=guess)
    assert calls == [guess, steps] and result == "run2"
    assert 95.0 <= spent <= 102.0 and steps == 1980  # 99% of the budget's 2000 steps


def test_a_machine_that_slows_down_keeps_the_longest_run_inside_the_budget():
    # Each run is 20% slower per step than the one before: the first run (under budget) is kept,
    # since every later rescale aims for fewer steps than that.
    train, calls = clock(lambda n, k: 0.05 * 1.2 ** (k - 1))
    steps, spent, result = fit_to_budget(train, budget=100.0, guess=1800)  # 90 s: under the window
    assert (steps, result) == (1800, "run1") and spent == pytest.approx(90.0)
    assert calls == [1800, 1980]  # the second run (1980 * 0.06 = 119 s) overshot


def test_when_no_run_fits_the_last_one_is_returned_for_the_report_to_flag():
    # Every run takes twice its predicted time: each rescaled guess overshoots again.
    train, calls = clock(lambda n, k: 0.1 * 2**k)
    steps, spent, result = fit_to_budget(train, budget=100.0, guess=600, tries=3)
    assert len(calls) == 3 and result == "run3" and spent > 102.0


@pytest.mark.parametrize("share, says", [(1.0, ""), (0.9, "only 90%"), (1.1, "overshot")])
def test_the_race_report_says_which_way_a_missed_budget_bends_the_result(share, says):
    from bench.train_speed import _race_caveat

    caveat = _race_caveat(share)
    assert (says in caveat) and (bool(caveat) == bool(says))


def test_bench_generate_prints_speed_mfu_and_rss_and_checks_the_cache(capsys, tmp_path, monkeypatch):
    """Not a timing test: the sampling benchmark's table has every column, and cached sampling
    drew the same tokens as uncached."""
    from bench.generate import main

    monkeypatch.chdir(tmp_path)  # --write is off: nothing may appear under reports/
    assert main(["--new-tokens", "4", "--overflow", "refill", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| overflow | KV cache | tokens/s | ms/token | MFU |" in out and "peak RSS" in out
    rows = [line for line in out.splitlines() if line.startswith("| refill |")]
    assert len(rows) == 2 and all(r.rstrip().endswith("| yes |") for r in rows)
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize(
    "ratio, flags, warns",
    [
        (4.3, {"avx512f", "avx512_bf16"}, False),  # a quiet Zen 5
        (2.2, {"avx512f", "avx512_bf16"}, True),  # the same machine throttled or shared
        (2.2, {"amx_bf16"}, True),
        (1.1, {"avx2"}, False),  # no native bf16: nothing to expect
    ],
)
def test_a_throttled_bf16_peak_is_flagged_only_where_bf16_is_native(ratio, flags, warns):
    from bench.mfu import bf16_caveat

    caveat = bf16_caveat(ratio, flags)
    assert bool(caveat) == warns and (not warns or f"{ratio:.1f}x" in caveat)


DEVICE_LACKS = ("mlflow", "datasets", "dvc")
"""Packages of requirements.lock that the device machine's image does not have (the device tool's KINDS.md); what
bench/gpu.sh runs must not import them (pydantic travels as wheels: `make gpu-wheels`)."""
WITHOUT_THEM = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {DEVICE_LACKS!r}:
            raise ImportError(f"{{name}} is not installed on the device machine")
sys.meta_path.insert(0, Absent())
from bench.gpu_check import main
main(sys.argv[1:])
"""


def _tiny_gpu_check(tmp_path: Path) -> list[str]:
    """The arguments of bench.gpu_check for a tiny GPT on a Shakespeare excerpt (a char tokenizer and a params file
    in `tmp_path`), writing its table to ``tmp_path / "gpu.md"``."""
    import yaml

    from lm.config import TokenizerConfig
    from lm.tokenizer import tokenize_corpus

    from tiny import FIXTURE_CORPORA, tiny_params

    text = (FIXTURE_CORPORA / "tinyshakespeare.txt").read_text()[:20000]
    tok = tmp_path / "tok"
    tokenize_corpus(TokenizerConfig(corpus="c", kind="char"), {"train": [text[:18000]], "val": [text[18000:]]},
                    "text", tok)  # fmt: skip
    params = tiny_params(
        {
            "gpt": {
                "tokenizer": "shakespeare-char",
                "model": {"family": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.1},
                "train": {"max_steps": 12, "batch_size": 4, "eval_interval": 4, "eval_batches": 2, "warmup_steps": 2},
            }
        }
    )
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    return [
        "--params",
        str(tmp_path / "p.yaml"),
        "--run",
        "gpt",
        "--tokenizer",
        str(tok),
        "--out",
        str(tmp_path / "gpu.md"),
    ]


def _table_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(("| study", "| ref"))]


def test_the_gpu_check_trains_both_sides_and_scores_them_alike(tmp_path):
    """bench.gpu_check end to end on a tiny run (on the CPU here), in a process where the packages the device machine
    lacks cannot be imported: the study's row and the reference's row, each with its selected step and a whole-split
    val loss from the same scorer; bench/nanogpt.py uses no study code."""
    import ast
    import subprocess
    import sys

    from tiny import ROOT

    args = _tiny_gpu_check(tmp_path)
    done = subprocess.run([sys.executable, "-c", WITHOUT_THEM, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _table_rows(tmp_path / "gpu.md")
    assert len(rows) == 2 and all("| **" in r for r in rows)
    # the race: the study scored on the whole split at each of its 3 evaluations, against the reference's clock
    text = (tmp_path / "gpu.md").read_text()
    clock = float(re.search(r"its training time, \*\*([0-9.]+) s\*\*", text).group(1))
    assert "at each of its 3 evaluations" in text
    targets = re.findall(r"^- target ([0-9.]+) \((.*?)\): (.*)$", text, re.M)
    assert [t[1].split(",")[0] for t in targets] == ["the reference's val loss on the day", "published"]
    for _, _, said in targets:
        hit = re.fullmatch(r"reached at step (\d+) after ([0-9.]+) s of training: \*\*([0-9.]+)x\*\*", said)
        assert hit or said.startswith("not reached (best "), said
        if hit:
            assert int(hit[1]) in (4, 8, 12) and abs(float(hit[3]) * float(hit[2]) - clock) < 0.01 * clock + 0.1
    nanogpt = ast.parse((Path(__file__).parents[1] / "bench" / "nanogpt.py").read_text())
    imported = {n.module for n in ast.walk(nanogpt) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(nanogpt) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.split(".")[0] in ("lm", "stages") for m in imported)


def test_the_gpu_race_times_the_study_to_the_first_whole_split_score_at_or_under_each_target():
    from bench.gpu_check import race

    study = {"checkpoints": [(250, 10.0, 1.60), (500, 20.0, 1.47), (750, 30.0, 1.4697), (1000, 40.0, 1.40)]}
    lines = race(study, {"train_s": 90.0, "val": 1.5})
    assert "its training time, **90.0 s**" in lines[0] and "each of its 4 evaluations" in lines[0]
    assert lines[2] == "- target 1.5000 (the reference's val loss on the day): reached at step 500 after 20.0 s of " \
        "training: **4.50x**"  # fmt: skip
    assert lines[3].startswith("- target 1.4697 (published, ")
    assert lines[3].endswith("reached at step 750 after 30.0 s of training: **3.00x**")
    assert race(study, {"train_s": 90.0, "val": 1.0})[2].endswith("not reached (best 1.4000)")


def test_the_gpu_check_keeps_the_studys_row_when_the_reference_is_cut_short(tmp_path, monkeypatch):
    # A device call has a time limit: the study's row is written before the reference starts, so a run stopped
    # during the reference still brings back the study's number.
    from bench import gpu_check

    def stopped(*_):
        raise KeyboardInterrupt("the device call's time limit")

    monkeypatch.setattr(gpu_check, "reference", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(_tiny_gpu_check(tmp_path))
    rows = _table_rows(tmp_path / "gpu.md")
    assert len(rows) == 1 and rows[0].startswith("| study") and "| **" in rows[0]


def test_the_batchnorm_reference_draws_the_lectures_split_which_is_the_studys():
    # bench.makemore_bn is makemore part 3 written independently of the study: its split must be the study's
    # seed-42 split of names.txt, and its examples the lecture's Xtr / Xdev / Xte (182,625 / 22,655 / 22,866).
    from bench import makemore_bn
    from lm.config import SplitConfig
    from lm.data import split_corpus

    from tiny import SOURCE_CORPORA

    text = (SOURCE_CORPORA / "names.txt").read_text(encoding="utf-8")
    ref = makemore_bn.split_words(text.splitlines())
    assert ref == split_corpus(text, "lines", SplitConfig(train=0.8, val=0.1, test=0.1), seed=42)
    stoi = makemore_bn.vocab(text.splitlines())
    assert len(stoi) == 27 and stoi["."] == 0 and stoi["a"] == 1
    sizes = {name: makemore_bn.build_dataset(words, stoi)[0].shape for name, words in ref.items()}
    assert sizes == {"train": (182625, 3), "val": (22655, 3), "test": (22866, 3)}


def test_the_batchnorm_reference_starts_at_ln_v_learns_and_repeats_itself(tmp_path):
    from bench import makemore_bn

    from tiny import FIXTURE_CORPORA

    words = (FIXTURE_CORPORA / "names.txt").read_text(encoding="utf-8").splitlines()
    stoi = makemore_bn.vocab(words)
    data = {name: makemore_bn.build_dataset(ws, stoi) for name, ws in makemore_bn.split_words(words).items()}
    start = makemore_bn.train_one(7, data, len(stoi), steps=0)
    assert start["val"] == pytest.approx(math.log(len(stoi)), abs=0.03)  # W2 * 0.01: near-uniform logits
    first, again = (makemore_bn.train_one(7, data, len(stoi), steps=300) for _ in range(2))
    assert first["train"] < start["train"] - 0.5
    assert {k: first[k] for k in ("train", "val", "test")} == {k: again[k] for k in ("train", "val", "test")}
    out = tmp_path / "bn.md"
    makemore_bn.main(
        ["--names", str(FIXTURE_CORPORA / "names.txt"), "--seeds", "1", "2", "--steps", "20", "--out", str(out)]
    )
    rows = out.read_text().splitlines()
    assert sum(r.startswith("| 1 |") or r.startswith("| 2 |") for r in rows) == 2
    assert any(r.startswith("| mean |") for r in rows) and any(r.startswith("| sd |") for r in rows)


def test_the_transformer_reference_is_makemores_shape_split_and_rows():
    import torch

    from bench import makemore_transformer as mt

    from tiny import SOURCE_CORPORA

    words = (SOURCE_CORPORA / "names.txt").read_text(encoding="utf-8").splitlines()
    torch.manual_seed(mt.MAKEMORE_SEED)
    train, test = mt.split(words)
    assert (len(train), len(test)) == (31033, 1000) and sorted(train + test) == sorted(words)
    torch.manual_seed(mt.MAKEMORE_SEED)
    assert mt.split(words) == (train, test)  # the seed fixes it
    stoi = {c: i + 1 for i, c in enumerate(sorted(set("".join(words))))}
    X, Y = mt.encode(["emma"], stoi, 16)
    e, m, a = stoi["e"], stoi["m"], stoi["a"]
    assert X[0, :6].tolist() == [0, e, m, m, a, 0] and Y[0, :6].tolist() == [e, m, m, a, 0, -1]
    assert (Y[0, 5:] == -1).all()
    model = mt.Transformer(27, 16)
    assert sum(p.numel() for p in model.parameters()) == 204_544  # makemore.py's default model


def test_the_transformer_reference_keeps_its_lowest_test_estimate(tmp_path):
    from bench import makemore_transformer as mt

    from tiny import FIXTURE_CORPORA

    out = tmp_path / "tf.md"
    mt.main(["--names", str(FIXTURE_CORPORA / "names.txt"), "--steps", "500", "--every", "500", "--out", str(out)])
    text = out.read_text()
    kept = [r for r in text.splitlines() if r.startswith("| 3407 | 500 |")]
    assert len(kept) == 2  # the trace row and the kept-model row
    cells = [float(c) for c in kept[1].strip("|").split("|")[2:4]]
    assert all(1.5 < c < math.log(27) for c in cells)  # learned something; estimate and whole split agree in range


def test_the_transformer_reference_can_select_on_val_and_report_test(tmp_path):
    from bench import makemore_transformer as mt

    from tiny import FIXTURE_CORPORA

    out = tmp_path / "tf.md"
    names = str(FIXTURE_CORPORA / "names.txt")
    mt.main(
        [
            "--names",
            names,
            "--split",
            "study",
            "--select",
            "val",
            "--steps",
            "1000",
            "--every",
            "500",
            "--out",
            str(out),
        ]
    )
    text = out.read_text()
    assert "lowest val estimate" in text and "| whole val split | whole test split |" in text
    trace, kept = [r for r in text.splitlines() if r.startswith("| 3407 | ")][:2], text.splitlines()[-3]
    assert all(len(r.strip("|").split("|")) == 5 for r in trace)  # step, train, val and test estimates
    cells = kept.strip("|").split("|")
    assert cells[1].strip() in {"500", "1,000"} and all(1.5 < float(c) < math.log(27) for c in cells[2:5])
    with pytest.raises(SystemExit) as exc:  # makemore's own split has no val names to select on
        mt.main(["--names", names, "--select", "val"])
    assert exc.value.code == 2


@pytest.mark.parametrize("module", ["makemore_bn", "makemore_transformer"])
def test_a_reference_without_names_txt_says_where_to_point_it(module, tmp_path, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"bench.{module}").main(["--names", str(tmp_path / "missing.txt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "names.txt not found" in err and "--names PATH" in err and "LM_DATA_MIRROR" in err


def test_the_transformer_reference_on_the_study_split_tests_on_the_seed_runs_names():
    import yaml

    from bench import makemore_transformer as mt
    from lm.config import SplitConfig
    from lm.data import split_corpus

    from tiny import ROOT, SOURCE_CORPORA

    text = (SOURCE_CORPORA / "names.txt").read_text(encoding="utf-8")
    preset = yaml.safe_load((ROOT / "presets" / "sources.yaml").read_text())
    parts = split_corpus(text, "lines", SplitConfig(**preset["corpora"]["names-makemore"]["split"]), preset["seed"])
    train, val, test = mt.study_split(text.splitlines())
    assert (train, val, test) == (parts["train"], parts["val"], parts["test"])
    assert (len(train), len(val), len(test)) == (30034, 999, 1000)


def _seeds_setup(tmp_path: Path) -> list[str]:
    """A params file with two tiny GPTs (the second one layer deeper) and a counted bigram, a char tokenizer for
    them in ``tmp_path/tokenizers``, and the bench.seeds arguments that point at both."""
    import yaml

    from lm.config import TokenizerConfig
    from lm.tokenizer import tokenize_corpus

    from tiny import FIXTURE_CORPORA, tiny_params

    text = (FIXTURE_CORPORA / "tinyshakespeare.txt").read_text()[:20000]
    tokenize_corpus(TokenizerConfig(corpus="c", kind="char"), {"train": [text[:18000]], "val": [text[18000:]]},
                    "text", tmp_path / "tokenizers" / "shakespeare-char")  # fmt: skip
    model = {"family": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    train = {"max_steps": 6, "batch_size": 4, "eval_interval": 3, "eval_batches": 2, "warmup_steps": 1}
    params = tiny_params(
        {
            "a": {"tokenizer": "shakespeare-char", "model": model, "train": train},
            "b": {"tokenizer": "shakespeare-char", "model": {**model, "n_layer": 2}, "train": train},
            "counted": {"tokenizer": "shakespeare-char", "model": {"family": "bigram_counts"}},
        }
    )
    params["report"]["ablation"] = ["a", "b"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    return ["--params", str(tmp_path / "p.yaml"), "--tokenizers", str(tmp_path / "tokenizers"),
            "--metrics", str(tmp_path / "metrics")]  # fmt: skip


def test_the_seed_spread_trains_each_run_per_seed_and_pairs_consecutive_runs(tmp_path):
    from bench import seeds

    args = _seeds_setup(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "a.json").write_text('{"val/loss": 4.0}')
    out = tmp_path / "seeds.md"
    seeds.main([*args, "--ablation", "--seeds", "3", "4", "--out", str(out), "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = out.read_text().splitlines()
    row = {line.split("|")[1].strip(): line.strip("|").split("|") for line in lines if line.startswith("| a |")}
    a3, a4 = float(row["a"][1]), float(row["a"][2])
    assert a3 != a4 and all(1.0 < v < 5.0 for v in (a3, a4))  # the seed moves the number
    assert float(row["a"][3]) == pytest.approx((a3 + a4) / 2, abs=1e-4) and row["a"][-1].strip() == "4.0000"
    paired = [line for line in lines if line.startswith("| b | a |")]
    assert len(paired) == 1 and paired[0].strip("|").split("|")[2].strip() == ""  # b has no committed number
    b = next(line for line in lines if line.startswith("| b |") and "| a |" not in line).strip("|").split("|")
    diffs = [float(b[1]) - a3, float(b[2]) - a4]
    assert float(paired[0].strip("|").split("|")[3]) == pytest.approx(sum(diffs) / 2, abs=2e-4)
    again = tmp_path / "again.md"
    seeds.main([*args, "a", "--seeds", "3", "--out", str(again)])  # same seed, same number
    assert f"| a | {a3:.4f} |" in again.read_text()
    bpc = tmp_path / "bpc.md"
    seeds.main([*args, "a", "--seeds", "3", "--metric", "bpc", "--out", str(bpc)])
    text = bpc.read_text()
    cell = next(line for line in text.splitlines() if line.startswith("| a |")).split("|")[2]
    assert "val bpc (bits/character)" in text and float(cell) == pytest.approx(a3 / math.log(2), rel=1e-3)  # char


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["nope"], "'nope' is not a run of"),
        (["counted"], "counted: a counted model has no seed to vary"),
        (["a", "--seeds", "1", "1"], "--seeds repeats a seed"),
        ([], "name at least one RUN, or --ablation"),
    ],
)
def test_the_seed_spread_refuses_bad_input_before_training(tmp_path, capsys, extra, message):
    from bench import seeds

    with pytest.raises(SystemExit) as exc:
        seeds.main([*_seeds_setup(tmp_path), *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_seed_spread_names_the_stage_that_builds_a_missing_tokenizer(tmp_path, capsys):
    import shutil

    from bench import seeds

    args = _seeds_setup(tmp_path)
    shutil.rmtree(tmp_path / "tokenizers" / "shakespeare-char")
    with pytest.raises(SystemExit):
        seeds.main([*args, "a"])
    assert "dvc repro tokenize@shakespeare-char" in capsys.readouterr().err


def test_bench_dtypes_table_pairs_each_run_by_dtype():
    from bench.dtypes import as_json, table

    results = [
        {"run": "a", "dtype": "bfloat16", "val": {"loss": 1.50, "bpc": 2.16}, "seconds": 60.0},
        {"run": "a", "dtype": "float32", "val": {"loss": 1.52, "bpc": 2.19}, "seconds": 90.0},
    ]
    text = table(results, ["a"], {"a": {"val/loss": 1.5001, "train/dtype": "bfloat16"}}, threads=2)
    assert "| a | 1.5000 | 1.5200 | +0.0200 | 2.1600 | 2.1900 | 1.5001 | bfloat16 |" in text
    assert as_json(results, ["a"]) == {
        "a": {"bfloat16": {"val/loss": 1.50, "val/bpc": 2.16}, "float32": {"val/loss": 1.52, "val/bpc": 2.19}}
    }


def test_bench_dtypes_refuses_to_train_bf16_without_native_bf16(tmp_path):
    """Held to AVX2 (as an AVX2-only CPU is), it refuses before training anything, naming why."""
    import os
    import sys

    from helpers import run
    from tiny import ROOT

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    r = run([sys.executable, "-m", "bench.dtypes", "--out", str(tmp_path / "d.md")], cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "no native bf16" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_bench_bitwise_trains_each_run_per_setting_in_a_fresh_process(tmp_path, capsys):
    """Each setting reaches torch in its own process (``portable`` gets ATen's scalar kernels), repeats are
    compared, the weights' digests go to the JSON another machine compares against, and a second machine with
    the same digests reads "yes"."""
    import json

    from bench import bitwise

    args = _seeds_setup(tmp_path)[:4]  # no --metrics
    out = tmp_path / "bits.md"
    bitwise.main([*args, "a", "counted", "--settings", "native", "portable", "--repeats", "2", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    caps = {(r["setting"], r["run"]): r["capability"] for r in record["results"]}
    assert caps["portable", "a"] == "DEFAULT" and caps["native", "a"] != "DEFAULT"
    assert set(record["digests"]) == {"native", "portable"} and set(record["digests"]["native"]) == {"a", "counted"}
    text = out.read_text()
    assert "| native | a | " in text and "| portable | counted | " in text
    rows = [line for line in text.splitlines() if line.startswith("| native |")]
    assert all("| yes | yes |" in row for row in rows), rows  # repeats agree; native equals itself
    capsys.readouterr()
    bitwise.main([*args, "a", "--settings", "native", "--repeats", "1", "--compare", str(out.with_suffix(".json"))])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| native | a |"))
    assert row.rstrip().endswith("| yes |"), row


def test_bench_bitwise_refuses_bad_input_before_training(tmp_path, capsys):
    from bench import bitwise

    args = _seeds_setup(tmp_path)[:4]  # no --metrics
    with pytest.raises(SystemExit) as exc:
        bitwise.main([*args, "nope", "--compare", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'nope' is not a run of" in err and "missing.json: not found" in err


def test_bench_stage_cost_times_every_part_of_a_stage_s_fixed_cost(tmp_path, capsys):
    """One row per part, each a number of seconds (their size is a figure, not asserted), the lock rewrite of the
    file given; a bad --repeats is refused before anything runs."""
    import re

    from bench import stage_cost

    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  check:\n    cmd: python -m stages.check --out params.ok\n")
    stage_cost.main(["--repeats", "1", "--lock", str(lock)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    parts = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert parts == ["python", "import torch", "import mlflow", "open the store (after import mlflow)",
                     "exit, with Python's last garbage collection", "exit, gc.freeze at exit (what stages do)",
                     "dvc.lock rewrite (0 KB)", "a stage's tracking, live", "a stage's tracking, deferred",
                     "replaying one deferred run (stages.track, per run)"]  # fmt: skip
    assert all(re.fullmatch(r"\| .+ \| -?\d+\.\d\d \|", row) for row in rows[1:]), rows
    with pytest.raises(SystemExit):
        stage_cost.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_bench_dtypes_merge_re_measures_the_named_runs_and_keeps_the_others(tmp_path):
    import json

    from bench.dtypes import _kept, as_json, table, with_kept

    row = lambda run, dtype, loss: {"run": run, "dtype": dtype, "val": {"loss": loss, "bpc": loss * 1.44}}  # noqa: E731
    old = [row("a", "bfloat16", 1.5), row("a", "float32", 1.6), row("b", "bfloat16", 2.0), row("b", "float32", 2.1)]
    (tmp_path / "d.json").write_text(json.dumps(as_json(old, ["a", "b"])))
    new = [row("b", "bfloat16", 1.0) | {"seconds": 60.0}, row("b", "float32", 1.2) | {"seconds": 60.0}]
    kept = _kept(tmp_path / "d.md", ["b"])
    assert list(kept) == ["a"]
    results, runs = with_kept(new, ["b"], kept, ["a", "b", "c"])
    assert runs == ["a", "b"] and as_json(results, runs)["a"] == as_json(old, ["a"])["a"]
    assert as_json(results, runs)["b"]["float32"]["val/loss"] == 1.2
    text = table(results, runs, {}, threads=2)
    assert "| a | 1.5000 | 1.6000 | +0.1000 |" in text and "| b | 1.0000 | 1.2000 | +0.2000 |" in text
    assert "2 trainings, 2.0 minutes" in text  # the kept rows are not counted as trained now


def test_bench_dtypes_merge_needs_the_runs_and_the_table(capsys):
    from bench import dtypes

    for argv in (["--merge"], ["--merge", "--out", "d.md"], ["--merge", "shakespeare-gpt"]):
        with pytest.raises(SystemExit):
            dtypes.main(argv)
        assert "--merge re-measures the RUNs named and keeps the other rows of --out" in capsys.readouterr().err
