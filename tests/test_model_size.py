"""`lm params` and lm/model_size.py: the Raschka learning journey's GPT-2 numbers exactly, every reference
configuration's published count, tied/untied views, sizes, FLOPs, run lookup, and the `lm` command's help and
import cost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lm import cli
from lm.families import BigramCountsConfig, GPTConfig
from lm.model_size import REFERENCES, build_meta, component_counts, format_report, param_report, report_for, resolve
from lm.models import COMPONENTS, build_model


@pytest.fixture(scope="module")
def gpt2_small():
    return report_for("gpt2-small")


def test_gpt2_small_matches_seed_003(gpt2_small):
    r = gpt2_small
    assert r.counts.total == 163_009_536 and r.untied.total == 163_009_536
    assert r.tied.total == 124_412_160
    c = r.counts.components
    assert c["token_embedding"] == 38_597_376 and c["head"] == 38_597_376
    assert c["position_embedding"] == 1024 * 768
    assert c["attention"] == 12 * 2_360_064 and c["feed_forward"] == 12 * 4_722_432
    assert len(r.counts.blocks) == 12
    for block in r.counts.blocks:
        assert block["attention"] == 2_360_064
        assert block["feed_forward"] == 4_722_432
        assert block["norm"] == 4 * 768
        assert block["token_embedding"] == block["head"] == 0
    assert round(r.counts.megabytes()["fp32"], 2) == 621.83 == round(163_009_536 * 4 / 2**20, 2)
    assert round(r.counts.megabytes()["bf16"], 2) == 310.92
    # the Raschka learning journey's shares are of the tied model (lm/references.py, gpt2-small-*-share)
    shares = r.tied.shares()
    assert round(100 * shares["token_embedding"]) == 31
    assert 45 <= 100 * shares["feed_forward"] < 46
    assert round(100 * shares["attention"]) == 23
    assert r.tied.components["head"] == 0  # the tied matrix is counted once, as token embedding


def test_gpt2_xl_and_every_published_count():
    assert report_for("gpt2-xl").counts.total == 1_637_792_000
    for name, ref in REFERENCES.items():
        if ref.published is not None:
            assert param_report(ref.model, ref.vocab_size).counts.total == ref.published, name
    assert report_for("nanogpt-shakespeare-char").counts.total == 10_788_929
    assert 600_000 <= report_for("bigram-to-transformer-cpu").counts.total <= 850_000


def test_models_are_counted_on_the_meta_device():
    model = build_meta(REFERENCES["gpt2-xl"].model, 50257)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_flops_per_token(gpt2_small):
    r = gpt2_small
    # N: every parameter but the token and position tables; the head counts (a matmul), tied or not.
    # For the tied model that is nanoGPT's get_num_params(non_embedding=True).
    assert r.flops_n == 124_412_160 - 786_432 == 123_625_728
    assert r.flops_attention == 12 * 12 * 768 * 1024
    assert r.flops_per_token == 6 * 123_625_728 + 12 * 12 * 768 * 1024
    tied = param_report(REFERENCES["gpt2-small"].model.model_copy(update={"tie_weights": True}), 50257)
    assert tied.flops_per_token == r.flops_per_token
    assert report_for("makemore-mlp").flops_attention == 0
    counted = param_report(BigramCountsConfig(family="bigram_counts"), 27)  # fitted by counting: no FLOPs
    assert counted.counts.total == 729 and counted.flops_per_token is None


def test_a_tied_config_reports_both_views():
    cfg = REFERENCES["gpt2-small"].model.model_copy(update={"tie_weights": True})
    r = param_report(cfg, 50257)
    assert r.counts.total == r.tied.total == 124_412_160 and r.untied.total == 163_009_536
    assert "tied head *" in format_report(r)


def test_non_gpt_families_have_one_view():
    r = report_for("journey-wavenet-176k")
    assert r.counts.total == 175_767 and r.tied is None and r.untied is None and r.counts.blocks == []
    assert set(r.counts.components) == set(COMPONENTS)


def test_parameter_distribution_is_this_implementation():

    torch.manual_seed(0)
    model = build_model(GPTConfig(family="gpt", block_size=8, n_embd=16, n_head=2, n_layer=2, tie_weights=True), 11)
    dist = component_counts(model)
    assert dist == component_counts(model)
    assert sum(dist.values()) == sum(p.numel() for p in model.parameters())
    assert "head" not in dist  # the tied matrix is the token embedding; no head bias


def test_report_reference_shares_come_from_lm_params():
    from lm.report.figures import reference_shares

    shares = reference_shares()
    assert {sum(v.values()) for v in shares.values()} == {163_009_536, 124_412_160}


# ----------------------------------------------------------------------------------------------
# runs of a params file


def test_run_vocab_from_tokenizer_stats(repo_root, tmp_path):
    params = repo_root / "params.yaml"
    from lm.config import load_params

    study = load_params(params)
    name = next(n for n, r in study.runs.items() if r.model.family == "gpt")
    tok = study.runs[name].tokenizer
    with pytest.raises(ValueError, match=rf"{tok}/stats.json does not exist yet.*--vocab-size"):
        resolve(name, params=params, tokenizers_dir=tmp_path)
    (tmp_path / tok).mkdir()
    (tmp_path / tok / "stats.json").write_text(json.dumps({"vocab_size": 77}))
    cfg, vocab, _, source = resolve(name, params=params, tokenizers_dir=tmp_path)
    assert vocab == 77 and source.endswith("stats.json") and cfg == study.runs[name].model
    torch.manual_seed(0)
    expected = sum(p.numel() for p in build_model(cfg, 77).parameters())
    assert report_for(name, params=params, tokenizers_dir=tmp_path).counts.total == expected
    assert resolve(name, params=params, tokenizers_dir=tmp_path, vocab_size=5)[1] == 5  # the option overrides


def test_unknown_name_lists_runs_and_references(repo_root):
    with pytest.raises(ValueError, match=r"unknown run 'nope'; runs in .*params.yaml: .*; references: gpt2-small, "):
        resolve("nope", params=repo_root / "params.yaml")
    with pytest.raises(ValueError, match="not a reference .* and no params file"):
        resolve("nope", params=repo_root / "absent.yaml")


# ----------------------------------------------------------------------------------------------
# the command


def test_lm_params_table_and_json(capsys):
    assert cli.main(["params", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    for text in (
        "163,009,536",
        "124,412,160",
        "38,597,376",
        "2,360,064",
        "4,722,432",
        "621.83 MB fp32",
        "per block (x12)",
        "855,000,576",
    ):
        assert text in out, text
    assert cli.main(["params", "gpt2-xl", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == 1_637_792_000 and data["untied"]["total"] == 1_637_792_000
    assert data["tied"]["total"] == 1_637_792_000 - 50257 * 1600
    assert len(data["per_block"]) == 48 and data["flops_per_token"]["n"] == data["tied"]["total"] - 1024 * 1600
    assert cli.main(["params", "nope", "--params", "absent.yaml"]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err


def test_cli_reference_names_match_lm_params():
    listed = [n.split(" (")[0].strip() for n in cli.REFERENCE_NAMES.split(", ")]
    assert listed == list(REFERENCES)


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, lm.cli; heavy = [m for m in ('torch', 'mlflow', 'datasets') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_option_is_explained(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) >= {"check-params", "params", "sample", "export"}
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            assert action.help, f"lm {name} {action.option_strings or action.dest} has no help"
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0 and "usage: lm " + name in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "params" in capsys.readouterr().out
