"""`lm export RUN --format hf`: the directory loads offline in transformers (GPT2LMHeadModel,
AutoTokenizer, PreTrainedTokenizerFast), its logits equal ours within 1e-5, greedy generation
matches, tied and untied heads and missing biases map correctly, and configurations GPT-2
cannot express are refused with the reason. Runs are trained here, in a tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm import checkpoint
from lm.cli import main
from lm.config import RunConfig
from lm.export import ExportError, export_hf, gpt2_problems
from lm.generate import generate
from lm.models import build_model
from lm.tokenizer import load_tokenizer

from tiny import train_tiny

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency of the export")

GPTS = {
    # untied head, no biases anywhere: zero biases are written, lm_head stays its own matrix
    "untied-nobias": {"tie_weights": False, "bias": False, "qkv_bias": False},
    # tied head, every bias (GPT-2's own layout)
    "tied-bias": {"tie_weights": True, "bias": True, "qkv_bias": True},
}

LLAMAS = {
    # grouped-query attention (1 KV head for 2 query heads), untied head, char vocabulary
    "llama-gqa": {"n_kv_head": 1, "tie_weights": False},
    # tied head, Llama 3's rotary base, an RMSNorm eps other than HF's default 1e-6, BPE vocabulary
    "llama-tied": {"tie_weights": True, "rope_base": 500000.0, "norm_eps": 1e-5},
}

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = {"family": "gpt", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
"""The exported runs' shape; each run overrides some of it."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mirror: Path) -> Path:
    root = tmp_path_factory.mktemp("export")
    text = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[:24000]
    splits = {"train": [text[:20000]], "val": [text[20000:]]}
    names = [n for n in (mirror / "names.txt").read_text().split() if len(n) <= 10][:1500]
    train_tiny(root, "untied-nobias", splits, "text", {"kind": "char"}, BASE | GPTS["untied-nobias"])
    train_tiny(root, "tied-bias", splits, "text", {"kind": "bpe", "vocab_size": 300}, BASE | GPTS["tied-bias"])
    train_tiny(root, "names", {"train": names[:1350], "val": names[1350:]}, "lines", {"kind": "char"}, BASE)
    for name, llama in LLAMAS.items():
        tok = {"kind": "char"} if "gqa" in name else {"kind": "bpe", "vocab_size": 300}
        train_tiny(
            root, name, splits, "text", tok, BASE | {"family": "llama", "block_size": 64, "multiple_of": 8, **llama}
        )
    for refused in ({"norm": "post"}, {"head_bias": True}, {"pos": "sinusoidal"}, {"pos": "rope"}):
        key = "-".join(f"{k}_{v}" for k, v in refused.items())
        train_tiny(root, f"refused-{key}", splits, "text", {"kind": "char"}, BASE | refused)
    return root


def export(runs: Path, name: str) -> Path:
    out = runs / "hf" / name
    export_hf(runs / "models" / name, runs / "tokenizers" / f"{name}-tok", out)
    return out


@pytest.mark.parametrize("name", ["untied-nobias", "tied-bias", "names"])
def test_exported_logits_and_greedy_generation_match(runs, name):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(export(runs, name)).eval()
    ours, run, vocab = checkpoint.load(runs / "models" / name)
    x = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], rtol=0, atol=1e-5)
    prompt = x[:1, :4]
    greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(greedy, generate(ours, prompt, 12, top_k=1))

    # The head is tied exactly when ours is, and an untied head is loaded as ours (not re-tied).
    tied = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert tied == run.model.tie_weights
    torch.testing.assert_close(hf.lm_head.weight, ours.lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LLAMAS))
def test_llama_export_logits_and_50_greedy_tokens_match(runs, name):
    """LlamaForCausalLM (eager attention, float32) computes our logits within 1e-5 and greedily generates the
    same 50 tokens; the config carries our RMSNorm eps and rotary base, not HF's defaults."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = export(runs, name)
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    ours, run, vocab = checkpoint.load(runs / "models" / name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rms_norm_eps"] == run.model.norm_eps == 1e-5 and cfg["rope_theta"] == run.model.rope_base
    assert hf.config.num_key_value_heads == run.model.kv_heads and cfg["intermediate_size"] == run.model.hidden
    x = torch.randint(0, vocab, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], rtol=0, atol=1e-5)
    prompt = x[:1, :4]
    greedy = hf.generate(prompt, max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(greedy, generate(ours, prompt, 50, top_k=1))
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == run.model.tie_weights
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        tok("ROMEO: hark")["input_ids"] == load_tokenizer(runs / "tokenizers" / f"{name}-tok").encode("ROMEO: hark").ids
    )


def test_config_matches_our_modules(runs):
    from transformers.activations import ACT2FN

    cfg = json.loads((export(runs, "untied-nobias") / "config.json").read_text())
    ours, _, _ = checkpoint.load(runs / "models" / "untied-nobias")
    assert cfg["activation_function"] == "gelu" and cfg["layer_norm_epsilon"] == ours.transformer.ln_f.eps
    assert cfg["tie_word_embeddings"] is False and cfg["n_positions"] == 16
    x = torch.randn(1000) * 4
    torch.testing.assert_close(ACT2FN[cfg["activation_function"]](x), ours.transformer.h[0].mlp.gelu(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["untied-nobias", "tied-bias", "names"])
def test_tokenizer_loads_offline_and_encodes_as_ours(runs, name):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lm.tokenizer import load_tokenizer

    out = export(runs, name)
    ours = load_tokenizer(runs / "tokenizers" / f"{name}-tok")
    text = "emma" if name == "names" else "ROMEO:\nWhat, ho! Art thou there?"
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        tok = cls.from_pretrained(out)
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text).ids  # no BOS/EOS added
        assert tok.decode(ids) == text
    if name == "names":
        assert tok.bos_token == tok.eos_token == "." and tok.eos_token_id == 0


@pytest.mark.parametrize(
    "key, reason",
    [
        ("norm_post", "norm 'post': GPT-2 normalises before each sublayer"),
        ("head_bias_True", "head_bias true: GPT-2's lm_head has no bias"),
        ("pos_sinusoidal", "pos 'sinusoidal': GPT-2 adds a learned position table"),
        ("pos_rope", "pos 'rope': GPT-2 adds a learned position table"),
    ],
)
def test_configs_gpt2_cannot_express_are_refused(runs, key, reason, capsys):
    name = f"refused-{key}"
    with pytest.raises(ExportError, match="cannot export as Hugging Face GPT-2"):
        export_hf(runs / "models" / name, runs / "tokenizers" / f"{name}-tok", runs / "hf" / name)
    assert not (runs / "hf" / name).exists()
    code = main(
        [
            "export",
            name,
            "--out",
            str(runs / "hf" / name),
            "--models-dir",
            str(runs / "models"),
            "--tokenizers-dir",
            str(runs / "tokenizers"),
        ]
    )
    assert code == 2 and reason in capsys.readouterr().err


def test_other_families_are_refused():
    run = RunConfig.model_validate({"tokenizer": "t", "model": {"family": "block"}})
    assert "only 'gpt' runs" in gpt2_problems(run)[0]
    assert gpt2_problems(RunConfig.model_validate({"tokenizer": "t", "model": {"family": "gpt"}})) == []


def test_lm_export_command(runs, capsys):
    out = runs / "hf" / "cli"
    code = main(
        [
            "export",
            "tied-bias",
            "--format",
            "hf",
            "--out",
            str(out),
            "--models-dir",
            str(runs / "models"),
            "--tokenizers-dir",
            str(runs / "tokenizers"),
        ]
    )
    assert code == 0 and "GPT2LMHeadModel.from_pretrained" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "lm_export.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert main(["export", "nope", "--out", str(out), "--models-dir", str(runs / "models")]) == 2
    assert "available runs:" in capsys.readouterr().err


def _export_cli(runs: Path, out: Path | str, *extra: str) -> int:
    dirs = ["--models-dir", str(runs / "models"), "--tokenizers-dir", str(runs / "tokenizers")]
    return main(["export", "tied-bias", "--tokenizer-dir", str(runs / "tokenizers" / "tied-bias-tok"), *dirs,
                 "--out", str(out), *extra])  # fmt: skip


def test_export_never_replaces_what_is_not_an_export(runs, tmp_path, capsys, monkeypatch):
    """A folder of the user's or a file at --out survives (exit 2, one line naming it and --force); an earlier
    export is replaced; --force replaces anything but the current directory."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert _export_cli(runs, mine) == 2
    err = capsys.readouterr().err
    assert f"error: --out {mine} is a non-empty folder that is not an lm export (no lm_export.json)" in err
    assert "pass --force to replace it" in err and (mine / "notes.txt").read_text() == "my notes"

    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x")
    assert _export_cli(runs, a_file) == 2 and a_file.read_bytes() == b"x"
    assert f"--out {a_file} is a file, not an export folder" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)
    for here in (".", str(tmp_path), ".."):
        assert _export_cli(runs, here) == 2
        assert "is the current directory or one above it: name a new folder" in capsys.readouterr().err
        assert _export_cli(runs, here, "--force") == 2  # never, even forced
    assert (mine / "notes.txt").exists()

    assert _export_cli(runs, tmp_path / "new") == 0  # a new folder
    assert _export_cli(runs, tmp_path / "new") == 0  # an earlier export: replaced
    assert _export_cli(runs, mine, "--force") == 0 and not (mine / "notes.txt").exists()
    assert (mine / "lm_export.json").is_file()


def test_export_never_replaces_the_checkpoint_it_exports(runs, capsys):
    """`--out models/RUN --force` replaced the checkpoint being exported (the run was then unloadable): the run's
    own folder, a folder inside it or one holding it is refused even with --force, and nothing is touched."""
    from lm.checkpoint import load

    ckpt = runs / "models" / "tied-bias"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    for out, how in ((ckpt, "is"), (ckpt / "hf", "is inside"), (runs / "models", "contains")):
        for extra in ((), ("--force",)):
            assert _export_cli(runs, out, *extra) == 2, (out, extra)
            err = capsys.readouterr().err
            assert f"error: --out {out} {how} {ckpt}, which the export reads" in err, err
            assert "--force does not override this" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before and not (ckpt / "hf").exists()
    load(ckpt)


def test_state_dict_names_and_shapes():
    from lm.export import hf_state_dict

    torch.manual_seed(0)
    run = RunConfig.model_validate(
        {
            "tokenizer": "t",
            "model": {"family": "gpt", "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8, "bias": False},
        }
    )
    model = build_model(run.model, 5)
    sd = hf_state_dict(model, run)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)  # Conv1D: (in, out)
    torch.testing.assert_close(sd["transformer.h.0.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight.T)
    assert not sd["transformer.h.0.attn.c_attn.bias"].any() and not sd["transformer.ln_f.bias"].any()
