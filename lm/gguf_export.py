"""Export a trained ``gpt`` or ``llama`` run as one GGUF file that llama.cpp loads (``lm export RUN --format gguf``).

GGUF is llama.cpp's format: metadata keys, the tokenizer and the tensors in one file, written here with the
``gguf`` package (gguf-py). llama.cpp is an implementation of the same mathematics written by other people, so
agreeing with it checks our model and our evaluation (lm/llamacpp.py runs it; docs/gguf.md has the numbers).

Architectures. A gpt run becomes llama.cpp's ``gpt2`` graph: learned positions, pre-norm LayerNorm blocks, a
fused QKV projection, a GELU feed-forward 4·n_embd wide, a final LayerNorm. That graph requires every bias, so
zeros are written where ours has none (as the Hugging Face export does, lm/export.py), and its GELU is the tanh
approximation read from an fp16 table: the one difference from our exact erf GELU, measured in docs/gguf.md.
Other gpt shapes (rotary or sinusoidal positions, RMSNorm, SwiGLU, post-norm, a head bias, grouped queries) are
refused with the reason, before anything is written (:func:`gguf_problems`).

A llama run becomes llama.cpp's ``llama`` graph. Rotary convention: ours rotates channel i with channel
i + hs/2 ("rotate half", as Hugging Face Llama); llama.cpp's llama graph rotates adjacent pairs (2i, 2i+1), as
Meta's original code. The two compute the same function once the rows of W_q and W_k are permuted within each
head (first half → even rows, second half → odd rows), which is what llama.cpp's own Hugging Face converter does
(:func:`rotary_to_interleaved`; the logits check fails without it, tests/test_gguf.py).

Tensors keep nn.Linear's (out, in) layout, which GGUF reads as ne = (in, out), llama.cpp's convention. 1-D
tensors (norms, biases) stay float32 whatever the type, as llama.cpp's converter does; 2-D tensors are stored in
``--type`` (f32, f16, q8_0 or q4_0: gguf-py's reference quantizers, blocks of 32 along a row) and fall back to f16
where a row is not a whole number of blocks (shakespeare-llama's feed-forward width of 341, say).

Tokenizer. The text travels inside the file so llama.cpp tokenizes it itself, as a ``gpt2`` (byte-level BPE)
vocabulary with GPT-2's pre-tokenizer:

- byte-level BPE runs: our tokens and merges unchanged (they are already GPT-2's byte-to-unicode strings);
- char runs: each character's UTF-8 bytes in byte-to-unicode form, with merges that only join the bytes of a
  multi-byte character, so every character becomes exactly its own token. gguf-py refuses an empty merge list,
  so an ASCII vocabulary gets one merge of the byte 0xFF with itself, which never occurs in UTF-8 text.
  A char tokenizer's ``[UNK]`` is written as llama.cpp's unknown token; llama.cpp drops characters it cannot
  tokenize instead, so a text with unknown characters tokenizes differently (tokenization check).

llama.cpp's gpt2 vocabulary always has an end-of-generation token, where generation stops. A names run uses
its boundary '.', which ends every name. A text run has none: the export names the token that occurs least in
the training split (ties: the highest id; for byte-level BPE, one of the byte tokens the training text never
needs; ``lm.eos_token`` in the file). Neither BOS nor EOS is added when llama.cpp tokenizes. Sampling settings are
not exported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lm import checkpoint
from lm.atomic import atomic_write_bytes
from lm.config import RunConfig
from lm.export import ExportError, gpt2_problems, tokenizer_stats

TYPES = ("f32", "f16", "q8_0", "q4_0")
"""The tensor types ``--type`` accepts (2-D tensors; 1-D ones stay f32)."""

NEVER_MERGES = "ÿ ÿ"
"""The placeholder merge of an ASCII char vocabulary: 'ÿ' is the byte 0xFF, which never occurs in UTF-8."""


class GGUFError(ExportError):
    """A run cannot be exported as GGUF (the message says why and what to do)."""


def gguf_problems(run: RunConfig) -> list[str]:
    """Why ``run`` cannot be one of llama.cpp's ``gpt2`` or ``llama`` graphs (empty if it can)."""
    m = run.model
    if m.family == "llama":
        return []
    if m.family != "gpt":
        return [
            f"family {m.family!r}: GGUF export supports 'gpt' (llama.cpp's gpt2 graph) and 'llama' runs, the "
            "families llama.cpp implements; export a gpt or llama run"
        ]
    return [p.replace("GPT-2", "llama.cpp's gpt2 graph") for p in gpt2_problems(run)]


def rotary_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Permute the rows of a query or key projection (n_head·hs, C) from rotate-half to adjacent-pair rotary.

    Ours pairs channel i with i + hs/2; llama.cpp's llama graph pairs 2i with 2i+1. Within each head, row i of the
    first half goes to row 2i and row i of the second half to row 2i+1, so the rotated pairs meet again (the
    permutation of llama.cpp's convert_hf_to_gguf.py)."""
    rows, cols = w.shape
    hs = rows // n_head
    w = w.reshape(n_head, 2, hs // 2, cols)  # (nh, half, hs/2, C): half 0 = channels [0, hs/2), half 1 the rest
    return w.transpose(1, 2).reshape(rows, cols)  # (nh, hs/2, 2, C) -> (nh·hs, C): pairs interleaved


GGUF_NAMES = (
    # Hugging Face name (lm/export.py's GPT-2 and Llama state dicts) -> llama.cpp's, as its convert_hf_to_gguf.py maps
    (r"transformer\.wte\.", "token_embd."),
    (r"transformer\.wpe\.", "position_embd."),
    (r"transformer\.ln_f\.", "output_norm."),
    (r"transformer\.h\.(\d+)\.ln_1\.", r"blk.\1.attn_norm."),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.", r"blk.\1.attn_qkv."),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.", r"blk.\1.attn_output."),
    (r"transformer\.h\.(\d+)\.ln_2\.", r"blk.\1.ffn_norm."),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.", r"blk.\1.ffn_up."),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.", r"blk.\1.ffn_down."),
    (r"model\.embed_tokens\.", "token_embd."),
    (r"model\.norm\.", "output_norm."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"blk.\1.attn_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.", r"blk.\1.attn_q."),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.", r"blk.\1.attn_k."),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.", r"blk.\1.attn_v."),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"blk.\1.attn_output."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blk.\1.ffn_norm."),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blk.\1.ffn_gate."),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"blk.\1.ffn_up."),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"blk.\1.ffn_down."),
    (r"lm_head\.", "output."),  # absent when tied: llama.cpp then reads token_embd, as ours
)
CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
"""GPT-2's Conv1D weights, which the Hugging Face export stores (in, out): back to nn.Linear's (out, in)."""


def gguf_name(hf_name: str) -> str:
    for pattern, repl in GGUF_NAMES:
        if re.match(pattern, hf_name):
            return re.sub(pattern, repl, hf_name, count=1)
    raise KeyError(f"no GGUF name for {hf_name}")


def tensors_for(model: nn.Module, run: RunConfig, *, interleave: bool = True) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors of a gpt or llama model: the Hugging Face export's state dict (lm/export.py: zero biases
    where ours has none, q/k/v split) under llama.cpp's names. ``interleave=False`` skips the rotary permutation of
    W_q and W_k (wrong for llama.cpp: the tests use it to show that the logits check catches it)."""
    from lm.export import hf_state_dict, llama_state_dict

    m = run.model
    llama = m.family == "llama"
    hf = llama_state_dict(model, run) if llama else hf_state_dict(model, run)
    out = {}
    for hf_name, t in hf.items():
        name = gguf_name(hf_name)
        if not llama and name.endswith(CONV1D):
            t = t.t()
        elif llama and interleave and name.endswith((".attn_q.weight", ".attn_k.weight")):
            t = rotary_to_interleaved(t, m.n_head if ".attn_q." in name else m.kv_heads)
        out[name] = t.contiguous()
    return out


@dataclass
class Vocab:
    """The tokenizer as llama.cpp's gpt2 vocabulary: tokens (byte-to-unicode strings), their types, merges, and
    the end-of-generation token."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos_id: int
    unk_id: int | None = None


def gguf_vocab(tokenizer, eos_id: int) -> Vocab:
    """The gpt2 vocabulary of one of our tokenizers (module docstring, Tokenizer)."""
    import json

    from gguf import TokenType
    from tokenizers import pre_tokenizers

    from lm.tokenizer import is_char, unk_id

    spec = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise GGUFError("the tokenizer's ids are not 0..V-1: it cannot be written as a GGUF token list")
    by_id = {i: t for t, i in vocab.items()}
    unk = unk_id(tokenizer)
    if not is_char(tokenizer):
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        tokens = [by_id[i] for i in ids]
        return Vocab(tokens, [int(TokenType.NORMAL)] * len(tokens), merges or [NEVER_MERGES], eos_id)
    # GPT-2's byte-to-unicode form of a character's UTF-8 bytes, one character per byte (tokenizers' ByteLevel)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens, merges = [], []
    for i in ids:
        text = by_id[i]
        if i == unk:
            tokens.append(text)
            continue
        pieces = list(byte_level.pre_tokenize_str(text)[0][0])
        for k in range(1, len(pieces)):  # join a multi-byte character left to right: (b1, b2), (b1b2, b3), ...
            merges.append("".join(pieces[:k]) + " " + pieces[k])
        tokens.append("".join(pieces))
    types = [int(TokenType.UNKNOWN if i == unk else TokenType.NORMAL) for i in ids]
    return Vocab(tokens, types, list(dict.fromkeys(merges)) or [NEVER_MERGES], eos_id, unk)


def eos_token(stats: dict, train_ids: np.ndarray | None, vocab_size: int) -> int:
    """The end-of-generation token llama.cpp will stop at: a names run's boundary, else the token the training
    split holds least often (ties: the highest id), so that greedy generation practically never meets it."""
    if stats.get("boundary_id") is not None:
        return int(stats["boundary_id"])
    if train_ids is None:
        raise GGUFError("a text run's export needs its training split (train.bin) to pick the end-of-text token")
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size)
    return int(vocab_size - 1 - np.argmin(counts[::-1]))


def _tensor_data(t: torch.Tensor, qtype: str):
    """(array, raw ggml type or None, fell back to f16) of one tensor in ``qtype``: 1-D tensors stay f32; q8_0/q4_0
    rows that are not whole blocks of 32 are stored in f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = t.numpy().astype(np.float32)
    if a.ndim == 1 or qtype == "f32":
        return a, None, False
    if qtype == "f16" or a.shape[-1] % 32:
        return a.astype(np.float16), None, qtype != "f16"
    kind = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    return quants.quantize(a, kind), kind, False


def _hparams(w, run: RunConfig, vocab_size: int) -> None:
    m = run.model
    w.add_context_length(m.block_size)
    w.add_embedding_length(m.n_embd)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(m.hidden)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.kv_heads)
    w.add_vocab_size(vocab_size)
    if m.family == "llama":
        w.add_layer_norm_rms_eps(m.norm_eps)
        w.add_rope_freq_base(m.rope_base)
        w.add_rope_dimension_count(m.n_embd // m.n_head)
    else:
        w.add_layer_norm_eps(m.norm_eps)


def _tokenizer_keys(w, vocab: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's regex: what tokenizers' ByteLevel(use_regex=True) splits with
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.eos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def _file_type(qtype: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[qtype]


@dataclass
class Exported:
    """What :func:`export_gguf` wrote."""

    path: Path
    architecture: str
    qtype: str
    eos_id: int
    f16_fallback: list[str]
    size_bytes: int


def write_gguf(
    path: Path,
    model: nn.Module,
    run: RunConfig,
    vocab: Vocab,
    qtype: str = "f32",
    *,
    name: str = "model",
    interleave: bool = True,
) -> Exported:
    """Write ``model`` (a gpt or llama run called ``name``) with ``vocab`` as a GGUF file at ``path``, atomically."""
    import gguf

    if qtype not in TYPES:
        raise GGUFError(f"--type {qtype!r}: choose one of {', '.join(TYPES)}")
    if problems := gguf_problems(run):
        raise GGUFError("cannot export as GGUF:\n" + "\n".join(f"  {p}" for p in problems))
    arch = "llama" if run.model.family == "llama" else "gpt2"
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fallback = []
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
        w.add_file_type(_file_type(qtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, run, len(vocab.tokens))
        _tokenizer_keys(w, vocab)
        w.add_string("lm.run", name)
        w.add_string("lm.eos_token", vocab.tokens[vocab.eos_id])
        for name, t in tensors_for(model, run, interleave=interleave).items():
            data, raw, fell_back = _tensor_data(t, qtype)
            if fell_back:
                fallback.append(name)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        atomic_write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(path, arch, qtype, vocab.eos_id, fallback, path.stat().st_size)


GGUF_MAGIC = b"GGUF"


def check_gguf_target(out: Path, force: bool = False, sources: Sequence[Path] = ()) -> None:
    """Refuse an ``--out`` that is a folder, lies inside a folder the export reads (``sources``), or is a file that
    is not a GGUF file (unless ``force``): only an earlier GGUF export is replaced without asking."""
    out = Path(out)
    if out.is_dir():
        raise GGUFError(f"--out {out} is a folder: name the .gguf file to write, e.g. {out / 'model.gguf'}")
    target = out.resolve()
    for src in sources:
        if Path(src).resolve() in target.parents:
            raise GGUFError(f"--out {out} is inside {src}, which the export reads: write it elsewhere, e.g. x.gguf")
    if force or not out.exists():
        return
    with open(out, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(
                f"--out {out} exists and is not a GGUF file: name a new file, or pass --force to replace it"
            )


def export_gguf(model_dir: Path, tokenizer_dir: Path, out: Path, qtype: str = "f32") -> Exported:
    """Export the checkpoint in ``model_dir`` with the tokenizer in ``tokenizer_dir`` (its train.bin picks a text
    run's end-of-text token) as the GGUF file ``out``, replaced atomically.

    Raises ExportError (GGUFError: a run llama.cpp cannot run, a bad type; a tokenizer that does not fit) before
    writing anything, or CheckpointError."""
    from lm.tokenizer import load_ids, load_tokenizer

    check_gguf_target(out, force=True, sources=(model_dir,))  # a folder, or inside the checkpoint: refused
    model, run, vocab_size = checkpoint.load(Path(model_dir))
    tokenizer_dir = Path(tokenizer_dir)
    stats = tokenizer_stats(tokenizer_dir, vocab_size)
    train_ids = load_ids(tokenizer_dir, "train") if (tokenizer_dir / "train.bin").is_file() else None
    vocab = gguf_vocab(load_tokenizer(tokenizer_dir), eos_token(stats, train_ids, vocab_size))
    return write_gguf(Path(out), model, run, vocab, qtype, name=Path(model_dir).name)
