"""`lm export RUN --format gguf`, checked by llama.cpp itself (built once from the llama-cpp-python sdist into the
git-ignored cache, never skipped): the metadata reads back with gguf's reader; llama.cpp tokenizes whole texts as
we do (char vocabularies with multi-byte characters, byte-level BPE); its logits equal ours within 1e-3 for gpt
(tied and untied, with and without biases) and llama (grouped-query) runs, and a llama export without the rotary
permutation fails that check; greedy generation through llama.cpp's KV cache and llama-completion equal ours;
llama-perplexity equals our scorer under its protocol; bad requests are refused before anything is written."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from lm import checkpoint, llamacpp
from lm.batches import Batches
from lm.cli import main
from lm.export import ExportError
from lm.generate import generate
from lm.gguf_export import export_gguf, gguf_vocab, rotary_to_interleaved, write_gguf
from lm.metrics import score
from lm.models.positions import apply_rotary
from lm.tokenizer import load_tokenizer

from tiny import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = {"family": "gpt", "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
RUNS = {
    # name: (tokenizer, model overrides)
    "gpt-char-untied-nobias": ({"kind": "char"}, {"bias": False, "tie_weights": False}),
    "gpt-bpe-tied-bias": ({"kind": "bpe", "vocab_size": 300}, {"tie_weights": True, "qkv_bias": True}),
    "llama-char-gqa": ({"kind": "char"}, {"family": "llama", "n_kv_head": 1, "multiple_of": 8}),
    "llama-bpe-tied": ({"kind": "bpe", "vocab_size": 300}, {"family": "llama", "tie_weights": True, "n_hidden": 40}),
}
ACCENTED = "Café naïve — “quoted” ünïcödé\n"
"""Multi-byte characters (2 and 3 bytes in UTF-8) in the training text: the char vocabulary's merges must join
their bytes, and nothing else."""


@pytest.fixture(scope="session")
def lc() -> llamacpp.LlamaCpp:
    return llamacpp.build(log=lambda m: print(m, flush=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mirror: Path) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    text = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[:24000]
    text = text[:9000] + ACCENTED + text[9000:20000] + ACCENTED + text[20000:]
    splits = {"train": [text[: 20000 + len(ACCENTED)]], "val": [text[20000 + len(ACCENTED) :]]}
    for name, (tok, model) in RUNS.items():
        train_tiny(root, name, splits, "text", tok, BASE | model)
    names = [n for n in (mirror / "names.txt").read_text().split() if len(n) <= 10][:1500]
    train_tiny(root, "names", {"train": names[:1350], "val": names[1350:]}, "lines", {"kind": "char"},
               BASE | {"block_size": 16}, max_steps=300)  # fmt: skip
    train_tiny(root, "gpt-rope", splits, "text", {"kind": "char"}, BASE | {"pos": "rope"})
    train_tiny(root, "mlp", splits, "text", {"kind": "char"}, {"family": "mlp", "block_size": 3, "n_embd": 4})
    return root


def export(runs: Path, name: str, qtype: str = "f32") -> Path:
    out = runs / "gguf" / f"{name}-{qtype}.gguf"
    out.parent.mkdir(exist_ok=True)
    export_gguf(runs / "models" / name, runs / "tokenizers" / f"{name}-tok", out, qtype)
    return out


def val_text(runs: Path, name: str) -> str:
    from lm.tokenizer import load_ids

    tok_dir = runs / "tokenizers" / f"{name}-tok"
    return load_tokenizer(tok_dir).decode([int(i) for i in load_ids(tok_dir, "val")])


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("name", list(RUNS))
def test_metadata_reads_back(runs, name):
    path = export(runs, name)
    model, run, vocab_size = checkpoint.load(runs / "models" / name)
    m, llama = run.model, run.model.family == "llama"
    r = GGUFReader(path)
    arch = field(r, "general.architecture")
    assert arch == ("llama" if llama else "gpt2")
    assert field(r, f"{arch}.context_length") == m.block_size and field(r, f"{arch}.block_count") == m.n_layer
    assert field(r, f"{arch}.embedding_length") == m.n_embd and field(r, f"{arch}.feed_forward_length") == m.hidden
    assert field(r, f"{arch}.attention.head_count") == m.n_head
    assert field(r, f"{arch}.attention.head_count_kv") == m.kv_heads
    if llama:
        assert math.isclose(field(r, "llama.attention.layer_norm_rms_epsilon"), m.norm_eps, rel_tol=1e-6)
        assert field(r, "llama.rope.freq_base") == m.rope_base
        assert field(r, "llama.rope.dimension_count") == m.n_embd // m.n_head
    else:
        assert math.isclose(field(r, "gpt2.attention.layer_norm_epsilon"), m.norm_eps, rel_tol=1e-6)
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(r, "tokenizer.ggml.tokens")) == vocab_size and field(r, "tokenizer.ggml.add_bos_token") is False
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}  # GGUF lists ne0 first
    assert shapes["token_embd.weight"] == (vocab_size, m.n_embd)
    assert ("output.weight" in shapes) == (not m.tie_weights)
    hs = m.n_embd // m.n_head
    if llama:
        assert shapes["blk.0.attn_q.weight"] == (m.n_head * hs, m.n_embd)
        assert shapes["blk.0.attn_k.weight"] == (m.kv_heads * hs, m.n_embd)
        assert shapes["blk.0.ffn_gate.weight"] == (m.hidden, m.n_embd)
    else:
        assert shapes["position_embd.weight"] == (m.block_size, m.n_embd)
        assert shapes["blk.1.attn_qkv.weight"] == (3 * m.n_embd, m.n_embd)
        for b in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"):
            assert f"blk.1.{b}.bias" in shapes  # llama.cpp's gpt2 graph requires every bias: zeros where ours has none
    assert len(shapes) == len(r.tensors)


def test_types_store_matrices_quantized_and_vectors_f32(runs):
    name = "llama-bpe-tied"  # n_embd 32: whole q8_0/q4_0 blocks; n_hidden 40: ffn_down rows are not
    for qtype, kind in (("f16", GGMLQuantizationType.F16), ("q8_0", GGMLQuantizationType.Q8_0),
                        ("q4_0", GGMLQuantizationType.Q4_0)):  # fmt: skip
        r = GGUFReader(export(runs, name, qtype))
        types = {t.name: t.tensor_type for t in r.tensors}
        assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
        assert types["blk.0.attn_q.weight"] == kind and types["token_embd.weight"] == kind
        assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.F16  # 40 columns: not whole blocks of 32
    sizes = [export(runs, name, t).stat().st_size for t in ("f32", "f16", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)


def test_rotary_permutation_turns_rotate_half_into_adjacent_pairs():
    """q·k under adjacent-pair rotary (llama.cpp's llama graph) with permuted W_q, W_k equals our rotate-half."""
    torch.manual_seed(0)
    nh, hs, C, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(nh * hs, C), torch.randn(nh * hs, C), torch.randn(T, C)
    theta = 10000.0 ** (-torch.arange(0, hs, 2) / hs)
    angles = torch.arange(T)[:, None] * theta  # (T, hs/2)

    def ours(w):
        h = (x @ w.T).view(T, nh, hs).transpose(0, 1)  # (nh, T, hs)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        return apply_rotary(h, cos, sin)

    def interleaved(w):
        h = (x @ w.T).view(T, nh, hs // 2, 2)  # (T, nh, hs/2, 2): adjacent pairs
        a, b = h[..., 0], h[..., 1]
        c, s = angles.cos()[:, None], angles.sin()[:, None]
        return torch.stack([a * c - b * s, a * s + b * c], -1).view(T, nh, hs).transpose(0, 1)

    want = ours(wq) @ ours(wk).transpose(-1, -2)
    got = interleaved(rotary_to_interleaved(wq, nh)) @ interleaved(rotary_to_interleaved(wk, nh)).transpose(-1, -2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unpermuted = interleaved(wq) @ interleaved(wk).transpose(-1, -2)
    assert not torch.allclose(unpermuted, want, atol=1e-3)


@pytest.mark.parametrize("name", list(RUNS))
def test_llama_cpp_tokenizes_the_whole_val_text_as_we_do(runs, lc, name):
    text = val_text(runs, name)
    assert "é" in text and "“" in text  # 2- and 3-byte characters
    ours = load_tokenizer(runs / "tokenizers" / f"{name}-tok").encode(text).ids
    assert llamacpp.tokenize(lc, export(runs, name), text) == ours


@pytest.mark.parametrize("name", list(RUNS))
def test_llama_cpp_logits_and_greedy_generation_equal_ours(runs, lc, name):
    path = export(runs, name)
    model, run, _ = checkpoint.load(runs / "models" / name)
    tok = load_tokenizer(runs / "tokenizers" / f"{name}-tok")
    ids = tok.encode(val_text(runs, name)).ids
    bs = run.model.block_size
    with llamacpp.Session(lc, path, bs, threads=1) as s:
        for start in (0, 1000):
            window = ids[start : start + bs]
            with torch.no_grad():
                ours = model(torch.tensor([window]))[0][0].numpy()
            assert np.abs(s.logits(window) - ours).max() < 1e-3
        prompt = ids[:5]
        want = generate(model, torch.tensor([prompt]), 100, top_k=1, overflow="refill")[0, 5:].tolist()
        assert s.greedy(prompt, 100) == want  # 100 tokens: the window is refilled from its last half 6 times
    prompt_text = tok.decode(prompt)
    done = llamacpp.complete(lc, path, prompt_text, bs - 5, bs, threads=1)
    inside = generate(model, torch.tensor([prompt]), bs - 5, top_k=1)[0, 5:].tolist()
    assert done.text == tok.decode(inside) and done.tokens_per_s > 0 and not done.stopped


def test_a_llama_export_without_the_rotary_permutation_fails_the_logits_check(runs, lc):
    name = "llama-char-gqa"
    model, run, _ = checkpoint.load(runs / "models" / name)
    tok = load_tokenizer(runs / "tokenizers" / f"{name}-tok")
    vocab = gguf_vocab(tok, 0)
    window = tok.encode(val_text(runs, name)).ids[: run.model.block_size]
    with torch.no_grad():
        ours = model(torch.tensor([window]))[0][0].numpy()
    diffs = {}
    for interleave in (True, False):
        path = runs / f"rotary-{interleave}.gguf"
        write_gguf(path, model, run, vocab, interleave=interleave)
        with llamacpp.Session(lc, path, run.model.block_size, threads=1) as s:
            diffs[interleave] = float(np.abs(s.logits(window) - ours).max())
    assert diffs[True] < 1e-3 < diffs[False], diffs


@pytest.mark.parametrize("name", ["gpt-char-untied-nobias", "llama-bpe-tied"])
def test_llama_perplexity_equals_our_scorer_under_its_protocol(runs, lc, name, tmp_path):
    model, run, _ = checkpoint.load(runs / "models" / name)
    tok = load_tokenizer(runs / "tokenizers" / f"{name}-tok")
    text = val_text(runs, name)
    (tmp_path / "val.txt").write_text(text, encoding="utf-8")
    bs = run.model.block_size
    got = llamacpp.perplexity(lc, export(runs, name), tmp_path / "val.txt", bs, threads=1)
    ids = np.asarray(tok.encode(text.removesuffix("\n")).ids)  # llama-perplexity's -f drops one final newline
    nats, count = score(model, Batches(ids, "text", seq_len=bs).chunks(bs, 8))
    assert got.chunks == len(ids) // bs and count == got.chunks * (bs - 1 - bs // 2)
    assert abs(got.ppl - math.exp(nats / count)) <= 6e-5  # it prints 4 decimals


def test_names_run_ends_a_name_at_its_boundary(runs, lc):
    """A names run's end-of-generation token is its boundary '.': llama-completion stops a name there."""
    path = export(runs, "names")
    r = GGUFReader(path)
    eos = field(r, "tokenizer.ggml.eos_token_id")
    assert field(r, "tokenizer.ggml.tokens")[eos] == "."
    model, _, _ = checkpoint.load(runs / "models" / "names")
    tok = load_tokenizer(runs / "tokenizers" / "names-tok")
    prompt = tok.encode(".ma").ids
    want = generate(model, torch.tensor([prompt]), 12, top_k=1, stop_id=eos)[0, 3:].tolist()
    done = llamacpp.complete(lc, path, ".ma", 12, 16, threads=1)
    assert len(want) > 2 and want[-1] == eos and done.stopped
    assert done.text == tok.decode(want)  # the name, then the boundary it stopped at


def test_llama_cpp_tools_keep_their_last_lines(runs, lc):
    """The build carries the logger patch once, and a tool that finishes in milliseconds prints all it has: 30 runs
    of llama-completion on a tiny model, each with its generated text and its final timing line (unpatched, about
    one run in 30 lost them on a 2-core machine, and every try on a busy one)."""
    file, _, line = llamacpp.LOG_FLUSH_PATCH
    assert (lc.root / "src" / file).read_text().count(line) == 1 and lc.root.name == llamacpp.BUILD
    path = export(runs, "names")
    done = [llamacpp.complete(lc, path, ".ma", 12, 16, threads=1) for _ in range(30)]  # raises if a timing is lost
    assert {(d.text, d.tokens, d.stopped) for d in done} == {(done[0].text, done[0].tokens, True)}


@pytest.mark.parametrize("count", [0, 2])
def test_the_patch_refuses_a_source_without_its_line_once(tmp_path, count):
    file, old, new = llamacpp.LOG_FLUSH_PATCH
    (tmp_path / file).parent.mkdir(parents=True)
    (tmp_path / file).write_text("int x;\n" + old * count)
    with pytest.raises(llamacpp.LlamaCppError, match=f"found it {count} times"):
        llamacpp._patch(tmp_path, file, old, new)
    (tmp_path / file).write_text("int x;\n" + old)
    llamacpp._patch(tmp_path, file, old, new)
    assert (tmp_path / file).read_text() == "int x;\n" + new


def test_text_run_eos_is_its_rarest_training_token(runs):
    from lm.tokenizer import load_ids

    r = GGUFReader(export(runs, "gpt-bpe-tied-bias"))
    eos = field(r, "tokenizer.ggml.eos_token_id")
    assert field(r, "lm.eos_token") == field(r, "tokenizer.ggml.tokens")[eos]
    counts = np.bincount(load_ids(runs / "tokenizers" / "gpt-bpe-tied-bias-tok", "train"), minlength=300)
    assert counts[eos] == 0 and eos == np.flatnonzero(counts == 0).max()  # never in the training text; ties: last


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("mlp", [], "family 'mlp': GGUF export supports 'gpt'"),
        ("gpt-rope", [], "pos 'rope'"),
        ("gpt-char-untied-nobias", ["--type", "q3_k"], "invalid choice: 'q3_k'"),
        ("gpt-char-untied-nobias", ["--format", "hf", "--type", "f16"], "--type applies to --format gguf only"),
    ],
)
def test_refusals_name_the_reason_and_write_nothing(runs, capsys, name, args, message, tmp_path):
    out = tmp_path / "x.gguf"
    argv = ["export", name, "--models-dir", str(runs / "models"), "--tokenizer-dir",
            str(runs / "tokenizers" / f"{name}-tok"), "--out", str(out)]  # fmt: skip
    argv += ["--format", "gguf"] if "--format" not in args else []
    with pytest.raises(SystemExit) if "invalid choice" in message else _nothing():
        code = main(argv + args)
        assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_out_must_be_a_new_file_or_an_earlier_gguf(runs, capsys, tmp_path):
    name = "gpt-char-untied-nobias"
    base = ["export", name, "--models-dir", str(runs / "models"), "--tokenizer-dir",
            str(runs / "tokenizers" / f"{name}-tok"), "--format", "gguf", "--out"]  # fmt: skip
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert main([*base, str(mine)]) == 2 and mine.read_text() == "mine"
    assert "is not a GGUF file" in capsys.readouterr().err
    assert main([*base, str(tmp_path)]) == 2 and "is a folder" in capsys.readouterr().err
    inside = runs / "models" / name / "x.gguf"
    assert main([*base, str(inside)]) == 2 and not inside.exists()
    assert "which the export reads" in capsys.readouterr().err
    out = tmp_path / "m.gguf"
    assert main([*base, str(out), "--type", "q8_0"]) == 0 and main([*base, str(out)]) == 0  # replaces its own
    assert "wrote" in capsys.readouterr().out and GGUFReader(out).fields["general.file_type"].contents() == 0
    assert main([*base, str(mine), "--force"]) == 0 and mine.read_bytes()[:4] == b"GGUF"


def test_a_failed_write_keeps_the_earlier_file(runs, monkeypatch):
    import gguf

    path = export(runs, "gpt-char-untied-nobias")
    before = path.read_bytes()

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export(runs, "gpt-char-untied-nobias")
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_a_tokenizer_of_another_size(runs):
    with pytest.raises(ExportError, match="the model expects"):
        export_gguf(runs / "models" / "gpt-char-untied-nobias", runs / "tokenizers" / "gpt-bpe-tied-bias-tok",
                    runs / "y.gguf")  # fmt: skip


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_gguf_entries_are_checked_against_runs():
    import copy

    import yaml
    from pydantic import ValidationError

    from lm.config import StudyConfig

    from tiny import ROOT, on_fixtures

    params = on_fixtures(yaml.safe_load((ROOT / "params.yaml").read_text()))
    for name, entry, message in [
        ("nope", {}, "gguf.nope: not a run of `runs`"),
        ("shakespeare-block-pre", {}, "gguf.shakespeare-block-pre: family 'block'; llama.cpp runs 'gpt' and 'llama'"),
        ("names-gpt", {}, "gguf.names-gpt: corpus 'names' is not a 'text' corpus"),
        ("shakespeare-gpt", {"types": ["q8_0"]}, "'f32' among them"),
        ("shakespeare-gpt", {"types": ["f32", "q3_k"]}, "gguf.shakespeare-gpt.types.1"),
        ("shakespeare-gpt", {"prompt_chars": 64}, "prompt_chars: must be below the run's block_size 64"),
        ("shakespeare-gpt", {"greedy": 5}, "gguf.shakespeare-gpt.greedy"),  # a misspelled key
    ]:
        p = copy.deepcopy(params) | {"gguf": {name: entry}}
        with pytest.raises(ValidationError) as e:
            StudyConfig.model_validate(p)
        assert message in str(e.value), str(e.value)
    assert StudyConfig.model_validate(params).gguf["shakespeare-gpt"].types == ["f32", "f16", "q8_0", "q4_0"]
