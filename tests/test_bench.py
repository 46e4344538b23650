"""The benchmarks' own logic, not their speed (timings are figures, never asserted).

* The race must give the study the most steps that fit the reference's wall-clock on a machine
  whose speed drifts: `fit_to_budget` against simulated clocks, and the report's caveat.
* The bf16 throttling warning, from given peaks and CPU flags.
* `bench.generate` end to end on a few tokens: every column, and the cache draws the same tokens.
"""

from __future__ import annotations

import pytest

from bench.train import fit_to_budget


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
    from bench.train import _race_caveat

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
    from bench.train import bf16_caveat

    caveat = bf16_caveat(ratio, flags)
    assert bool(caveat) == warns and (not warns or f"{ratio:.1f}x" in caveat)
