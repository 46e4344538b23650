"""Export a trained ``gpt`` run as a Hugging Face GPT-2 directory, a ``llama`` run as a Hugging Face Llama
directory (``lm export RUN --format hf``).

The GPT-2 directory loads offline with ``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` (a llama run's
with ``LlamaForCausalLM``; the mapping is in :func:`llama_state_dict`) and
``AutoTokenizer.from_pretrained(DIR)`` (a ``PreTrainedTokenizerFast`` over our tokenizer.json),
and its logits equal ours (tests/test_export.py). This module writes plain files and does not
import ``transformers``::

    DIR/config.json              GPT2Config: shapes, activation, LayerNorm eps, tie_word_embeddings
    DIR/model.safetensors        weights under GPT-2's names (transformer.h.{i}.attn.c_attn.weight, ...)
    DIR/generation_config.json   bos/eos (the boundary '.' of a 'lines' corpus), no pad
    DIR/tokenizer.json           our Hugging Face `tokenizers` tokenizer, unchanged
    DIR/tokenizer_config.json    tokenizer class, model_max_length = block_size, special tokens

Mapping. Our modules already carry GPT-2's names (nanoGPT layout). Three differences:

- GPT-2's ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``'s (out, in):
  ``c_attn``, ``c_proj`` and ``c_fc`` weights are written transposed.
- GPT-2 always has biases (qkv, projections, feed-forward, LayerNorms): where ours has none
  (``qkv_bias: false``, ``bias: false``) a zero bias is written, which computes the same function.
- The LM head: GPT-2 has none of its own bias. A tied head is stored once (``wte``) with
  ``tie_word_embeddings: true``; an untied one as ``lm_head.weight`` with
  ``tie_word_embeddings: false``, which GPT2LMHeadModel honours (it does not re-tie).

Activation and LayerNorm epsilon are read off the model: ``nn.GELU()`` (exact erf) is GPT-2's
``"gelu"``; the tanh approximation would be ``"gelu_new"``. GPT-2 cannot express a post-norm
block (no final ln_f, LayerNorm after the residual), a bias in the LM head, or sinusoidal
positions (it has a learned ``wpe`` table): such runs are refused with the reason.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lm import checkpoint
from lm.atomic import atomic_dir
from lm.config import RunConfig


class ExportError(ValueError):
    """A run cannot be exported in the requested format (the message says why)."""


def gpt2_problems(run: RunConfig) -> list[str]:
    """Why ``run`` cannot be a Hugging Face GPT-2 (empty if it can)."""
    m = run.model
    if m.family != "gpt":
        return [f"family {m.family!r}: only 'gpt' runs have GPT-2's shape (embeddings, pre-norm blocks, ln_f, LM head)"]
    problems = []
    if m.norm != "pre":
        problems.append(
            "norm 'post': GPT-2 normalises before each sublayer and ends with ln_f; a post-norm block "
            "(LayerNorm after the residual add, no ln_f) computes a different function"
        )
    if m.head_bias:
        problems.append("head_bias true: GPT-2's lm_head has no bias, so the exported logits would lose it")
    if m.pos != "learned":
        problems.append(
            f"pos {m.pos!r}: GPT-2 adds a learned position table (wpe); {m.pos} positions have no weights "
            "to put there and GPT2LMHeadModel cannot compute them"
        )
    if m.norm_class != "layernorm":
        problems.append(f"norm_class {m.norm_class!r}: GPT-2's norms are LayerNorms")
    if m.mlp != "gelu" or m.hidden != 4 * m.n_embd:
        problems.append(f"mlp {m.mlp!r} of width {m.hidden}: GPT-2's feed-forward is GELU, 4·n_embd wide")
    if m.kv_heads != m.n_head:
        problems.append(f"n_kv_head {m.n_kv_head}: GPT-2 has one key/value head per query head")
    return problems


def _activation(model: nn.Module) -> str:
    gelu = model.transformer.h[0].mlp.gelu
    if not isinstance(gelu, nn.GELU):
        raise ExportError(f"the feed-forward activation is {type(gelu).__name__}; GPT-2 export supports nn.GELU only")
    # transformers: "gelu" = exact erf GELU, "gelu_new" = the tanh approximation (GPT-2's original).
    return {"none": "gelu", "tanh": "gelu_new"}[gelu.approximate]


def _layer_norm_eps(model: nn.Module) -> float:
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ExportError(f"LayerNorms use different eps values {sorted(eps)}; GPT-2 has one layer_norm_epsilon")
    return eps.pop()


def hf_config(model: nn.Module, run: RunConfig, vocab_size: int, *, boundary_id: int | None = None) -> dict[str, Any]:
    """``config.json`` of the GPT-2 equivalent of ``model`` (a gpt run)."""
    m = run.model
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": m.block_size,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": 4 * m.n_embd,
        "activation_function": _activation(model),
        "layer_norm_epsilon": _layer_norm_eps(model),
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # softmax(q kᵀ / sqrt(head_size)), as F.scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(m.tie_weights),
        "bos_token_id": boundary_id,  # 'lines' corpora: the '.' boundary starts and ends each example
        "eos_token_id": boundary_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": "float32",
    }


def hf_state_dict(model: nn.Module, run: RunConfig) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names, Conv1D weights transposed, missing biases as zeros."""
    m = run.model
    C = m.n_embd
    src = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    out = {
        "transformer.wte.weight": src["transformer.wte.weight"],
        "transformer.wpe.weight": src["transformer.wpe.weight"],
        "transformer.ln_f.weight": src["transformer.ln_f.weight"],
        "transformer.ln_f.bias": src.get("transformer.ln_f.bias", zeros(C)),
    }
    for i in range(m.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + f"{ln}.weight"] = src[p + f"{ln}.weight"]
            out[p + f"{ln}.bias"] = src.get(p + f"{ln}.bias", zeros(C))
        for name, n_out in (("attn.c_attn", 3 * C), ("attn.c_proj", C), ("mlp.c_fc", 4 * C), ("mlp.c_proj", C)):
            # nn.Linear weight (out, in) -> Conv1D weight (in, out)
            out[p + f"{name}.weight"] = src[p + f"{name}.weight"].t()
            out[p + f"{name}.bias"] = src.get(p + f"{name}.bias", zeros(n_out))
    if not m.tie_weights:
        out["lm_head.weight"] = src["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def llama_config(run: RunConfig, vocab_size: int, *, boundary_id: int | None = None) -> dict[str, Any]:
    """``config.json`` of the Hugging Face Llama equivalent of a llama run.

    Our RMSNorm eps is written explicitly (HF's LlamaConfig defaults to 1e-6, ours and Meta's to 1e-5), and
    the rotary base under both ``rope_parameters`` (transformers 5) and ``rope_theta`` (earlier versions).
    Rotary layout needs no weight permutation: ours is already HF's half rotation (``rotate_half``)."""
    m = run.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.hidden,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.n_embd // m.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": m.block_size,
        "initializer_range": 0.02,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "rope_theta": m.rope_base,
        "attention_bias": False,
        "attention_dropout": m.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": bool(m.tie_weights),
        "bos_token_id": boundary_id,
        "eos_token_id": boundary_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": "float32",
    }


def llama_state_dict(model: nn.Module, run: RunConfig) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names: ``c_attn`` split into q/k/v_proj (rows: n_head query heads,
    then n_kv_head key heads, then n_kv_head value heads), ``c_gate``/``c_fc``/``c_proj`` → gate/up/down_proj."""
    m = run.model
    hs = m.n_embd // m.n_head
    src = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {
        "model.embed_tokens.weight": src["transformer.wte.weight"],
        "model.norm.weight": src["transformer.ln_f.weight"],
    }
    for i in range(m.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        wq, wk, wv = src[p + "attn.c_attn.weight"].split([m.n_head * hs, m.kv_heads * hs, m.kv_heads * hs])
        out |= {
            q + "input_layernorm.weight": src[p + "ln_1.weight"],
            q + "self_attn.q_proj.weight": wq,
            q + "self_attn.k_proj.weight": wk,
            q + "self_attn.v_proj.weight": wv,
            q + "self_attn.o_proj.weight": src[p + "attn.c_proj.weight"],
            q + "post_attention_layernorm.weight": src[p + "ln_2.weight"],
            q + "mlp.gate_proj.weight": src[p + "mlp.c_gate.weight"],
            q + "mlp.up_proj.weight": src[p + "mlp.c_fc.weight"],
            q + "mlp.down_proj.weight": src[p + "mlp.c_proj.weight"],
        }
    if not m.tie_weights:
        out["lm_head.weight"] = src["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def tokenizer_config(block_size: int, boundary: str | None) -> dict[str, Any]:
    """``tokenizer_config.json``: a PreTrainedTokenizerFast over tokenizer.json, adding no special tokens."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if boundary is not None:
        cfg.update(bos_token=boundary, eos_token=boundary)
    return cfg


MARKER = "lm_export.json"
"""Written into every export: which run it holds. A folder with it is an export `lm export` may replace."""


def check_target(out: Path, force: bool = False, sources: Sequence[Path] = ()) -> None:
    """Refuse an `--out` that holds something else than an earlier export: a non-empty folder of the user's, a
    file, or the current directory (or one above it), unless `force` (then replaced, the current directory
    never); and never, even forced, one that is, is inside or contains a folder the export reads (`sources`: the
    run's checkpoint and tokenizer), which replacing would destroy. An empty or missing folder is fine."""
    out = Path(out)
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise ExportError(f"--out {out} is the current directory or one above it: name a new folder, e.g. exports/run")
    for src in sources:
        source = Path(src).resolve()
        how = "is" if target == source else "is inside" if source in target.parents else "contains"
        if how != "contains" or target in source.parents:
            raise ExportError(
                f"--out {out} {how} {src}, which the export reads: name a new folder, e.g. exports/run "
                "(--force does not override this)"
            )
    if force or not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(
            f"--out {out} is a file, not an export folder: name a new folder, or pass --force to replace it"
        )
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExportError(
            f"--out {out} is a non-empty folder that is not an lm export (no {MARKER}): name a new folder, "
            "or pass --force to replace it and everything in it"
        )


def tokenizer_stats(tokenizer_dir: Path, vocab_size: int) -> dict:
    """The stats of the tokenizer in ``tokenizer_dir``; ExportError if its vocabulary is not the model's
    ``vocab_size`` (another run's tokenizer)."""
    from lm.tokenizer import load_stats

    stats = load_stats(tokenizer_dir)
    if int(stats["vocab_size"]) != vocab_size:
        raise ExportError(
            f"{tokenizer_dir} has {stats['vocab_size']} tokens but the model expects {vocab_size}: "
            "pass the tokenizer the run was trained with (--tokenizer-dir)"
        )
    return stats


def export_hf(model_dir: Path, tokenizer_dir: Path, out: Path, *, force: bool = False) -> Path:
    """Write the Hugging Face GPT-2 (gpt runs) or Llama (llama runs) directory of the checkpoint in ``model_dir``
    to ``out`` (replaced atomically: only an earlier export, an empty folder or, with ``force``, anything but the
    current directory).

    Raises ExportError (a target it must not replace; a run that cannot be a GPT-2, with the reasons) or
    CheckpointError.
    """
    from lm.tokenizer import load_tokenizer

    check_target(out, force, (model_dir, tokenizer_dir))

    model, run, vocab_size = checkpoint.load(Path(model_dir))
    llama = run.model.family == "llama"
    problems = [] if llama else gpt2_problems(run)
    if problems:
        raise ExportError("cannot export as Hugging Face GPT-2:\n" + "\n".join(f"  {p}" for p in problems))
    tokenizer_dir = Path(tokenizer_dir)
    stats = tokenizer_stats(tokenizer_dir, vocab_size)
    boundary_id = stats.get("boundary_id")
    boundary = load_tokenizer(tokenizer_dir).id_to_token(boundary_id) if boundary_id is not None else None
    if llama:
        config, weights = llama_config(run, vocab_size, boundary_id=boundary_id), llama_state_dict(model, run)
    else:
        config, weights = hf_config(model, run, vocab_size, boundary_id=boundary_id), hf_state_dict(model, run)
    generation = {"bos_token_id": boundary_id, "eos_token_id": boundary_id, "pad_token_id": None}
    with atomic_dir(Path(out)) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        shutil.copyfile(tokenizer_dir / "tokenizer.json", tmp / "tokenizer.json")
        marker = {"format": "hf", "checkpoint": str(model_dir), "tokenizer": str(tokenizer_dir)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(run.model.block_size, boundary), indent=2) + "\n"
        )
    return Path(out)
