"""A run's GGUF exports through llama.cpp: the checks that llama.cpp computes what we compute, and what each
quantization type costs in bits per character, file size and generation speed (the ``gguf@<run>`` stage).

Checks, on the f32 export (docs/gguf.md):

- tokenization: ``llama-tokenize`` of the whole val text against our val ids;
- logits: llama.cpp's logits of the first val window against ours (largest absolute difference);
- greedy: ``greedy_tokens`` tokens after the val text's first ``prompt_chars`` characters, llama.cpp's KV cache
  with the window refilled from its last half past block_size, against ``lm sample --top-k 1 --overflow refill``;
  and ``llama-completion``'s own greedy text inside one window against ours;
- perplexity: ``llama-perplexity`` on the val text against our scorer under llama.cpp's protocol
  (:meth:`lm.batches.Batches.chunks`).

Costs, per type: whole-val bits per character with llama.cpp's logits on exactly the windows our evaluate stage
scores (the difference to our float32 number), llama-perplexity's value, the file size, and llama-completion's
generation tokens/s beside ours (``lm sample``'s KV-cache path), each the median of ``speed_repeats`` runs.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lm import batches as B
from lm import checkpoint, llamacpp
from lm.config import GGUFConfig
from lm.generate import generate, stream
from lm.gguf_export import GGUFError, eos_token, gguf_problems, gguf_vocab, write_gguf
from lm.metrics import score
from lm.tokenizer import load_ids, load_stats, load_tokenizer

THREADS = 1
"""Threads for llama.cpp and for our side of the speed comparison: one each, a per-core comparison that another
process on the machine disturbs least (two OpenMP threads spinning on two cores stall when anything else runs)."""


class GGUFEvalError(ValueError):
    """A run whose exports the stage cannot check (a names run, a val split too short)."""


def _nats(session: llamacpp.Session, windows) -> tuple[float, int]:
    """Total nats and targets of llama.cpp's predictions over our evaluation windows (float64 sums, as ours)."""
    total, count = 0.0, 0
    for x, y in windows:
        for row_x, row_y in zip(x.tolist(), y, strict=True):
            logits = torch.from_numpy(session.logits(row_x)).double()  # (T, V)
            keep = row_y != B.IGNORE_INDEX
            nll = -logits.log_softmax(-1)[torch.arange(len(row_x)), row_y.clamp(min=0)]
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return total, count


class GGMLGelu(torch.nn.Module):
    """llama.cpp's CPU GELU, which its gpt2 graph uses (ggml_vec_gelu_f32 built with GGML_GELU_FP16): the tanh
    approximation read from a table indexed by the input rounded to fp16, so the output is fp16 too; inputs
    outside [-10, 10) pass as 0 or themselves. Put in our model, it shows how much of the logits' difference is
    this activation alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.half().float()
        y = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * h * (1 + 0.044715 * h * h)))
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y.half().float()))


def _gelu(model: torch.nn.Module) -> bool:
    """Whether ``model``'s feed-forward is an nn.GELU (a gpt run: llama.cpp computes it with :class:`GGMLGelu`)."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    return blocks is not None and isinstance(getattr(blocks[0].mlp, "gelu", None), torch.nn.GELU)


def _with_ggml_gelu(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    for block in twin.transformer.h:
        block.mlp.gelu = GGMLGelu()
    return twin


@torch.no_grad()
def _logit_diffs(model, theirs: np.ndarray, window: list[int]) -> dict[str, float]:
    """Largest |llama.cpp's logit - ours| on ``window``: with our model as it is ('ours') and, for a GELU model, with
    llama.cpp's GELU put in it ('ggml_gelu')."""
    models = {"ours": model} | ({"ggml_gelu": _with_ggml_gelu(model)} if _gelu(model) else {})
    return {k: float(np.abs(theirs - m(torch.tensor([window]))[0][0].numpy()).max()) for k, m in models.items()}


def _our_speed(model, prompt: list[int], n: int, repeats: int) -> float:
    """Tokens/s of our KV-cache generation (lm sample's path) counted as llama.cpp's eval timer counts: the tokens
    after the first, from the first one's arrival (the prompt's prefill excluded)."""
    rates, threads = [], torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for _ in range(repeats):
            it = stream(model, torch.tensor([prompt]), n, top_k=1)
            next(it)
            t0 = time.perf_counter()
            k = sum(1 for _ in it)
            rates.append(k / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(rates)


@dataclass
class _Ours:
    """Our side of every comparison, computed once per run."""

    val_text: str
    batches: B.Batches
    nats: float
    count: int
    characters: int
    protocol_ppl: float
    protocol_ppl_ggml_gelu: float | None
    protocol_targets: int
    prompt_text: str
    prompt: list[int]
    greedy: list[int]
    window_text: str


def _ours(model, run, tokenizer, stats: dict, val_ids, cfg: GGUFConfig) -> _Ours:
    bs = run.model.block_size
    val_text = tokenizer.decode([int(i) for i in val_ids])
    batches = B.for_model(run.model, val_ids, "text", None)
    characters = stats["splits"]["val"]["characters"] - len(tokenizer.decode([int(val_ids[0])]))
    # llama-perplexity reads its file as common's -f does: without one trailing newline.
    ppl_ids = np.asarray(tokenizer.encode(val_text.removesuffix("\n")).ids, dtype=np.int64)
    prompt_text = val_text[: cfg.prompt_chars]
    prompt = tokenizer.encode(prompt_text).ids
    with torch.no_grad():
        nats, count = score(model, batches.iterate(64))
        chunks = B.Batches(ppl_ids, "text", seq_len=bs)
        p_nats, p_count = score(model, chunks.chunks(bs, 64))
        gelu = score(_with_ggml_gelu(model), chunks.chunks(bs, 64)) if _gelu(model) else None
        greedy = generate(model, torch.tensor([prompt]), cfg.greedy_tokens, top_k=1, overflow="refill")
        window = generate(model, torch.tensor([prompt]), bs - len(prompt), top_k=1)  # llama-completion's room
    return _Ours(
        val_text, batches, nats, count, characters, math.exp(p_nats / p_count),
        gelu and math.exp(gelu[0] / gelu[1]), p_count, prompt_text, prompt,
        greedy[0, len(prompt) :].tolist(), tokenizer.decode(window[0, len(prompt) :].tolist()),
    )  # fmt: skip


def evaluate_gguf(
    name: str, model_dir: Path, tok_dir: Path, cfg: GGUFConfig, out_dir: Path, lc: llamacpp.LlamaCpp, *, log=print
) -> tuple[dict, dict]:
    """Export ``name`` in every type of ``cfg`` into ``out_dir`` and measure each through llama.cpp (module
    docstring). Returns the metrics (computed: the same on every run of the stage) and the generation speeds
    (measured: they vary from run to run), apart so that only the second varies."""
    model, run, vocab_size = checkpoint.load(model_dir)
    if problems := gguf_problems(run):
        raise GGUFError(f"{name} cannot be exported as GGUF:\n" + "\n".join(f"  {p}" for p in problems))
    model.eval()
    stats, tokenizer = load_stats(tok_dir), load_tokenizer(tok_dir)
    if stats["format"] != "text":
        raise GGUFEvalError(f"{name}: a 'lines' corpus (names) has no one val text for llama.cpp's tools to read")
    bs, threads = run.model.block_size, THREADS
    ours = _ours(model, run, tokenizer, stats, load_ids(tok_dir, "val"), cfg)
    vocab = gguf_vocab(tokenizer, eos_token(stats, load_ids(tok_dir, "train"), vocab_size))
    bpc = ours.nats / (math.log(2) * ours.characters)
    out: dict = {
        "run": name,
        "architecture": "llama" if run.model.family == "llama" else "gpt2",
        "block_size": bs,
        "vocab_size": vocab_size,
        "eos_token": vocab.tokens[vocab.eos_id],
        "val": {"tokens": ours.count, "characters": ours.characters, "bpc": bpc},
        "llama_cpp": {"version": llamacpp.VERSION},
        "types": {},
    }
    speed: dict = {
        "run": name,
        "threads": threads,
        "tokens": bs - len(ours.prompt),
        "repeats": cfg.speed_repeats,
        "ours_tokens_per_s": _our_speed(model, ours.prompt, bs - len(ours.prompt), cfg.speed_repeats),
        "llama_cpp_tokens_per_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "val.txt"
        text_file.write_text(ours.val_text, encoding="utf-8")
        for qtype in cfg.types:
            path = out_dir / f"{name}-{qtype}.gguf"
            exported = write_gguf(path, model, run, vocab, qtype, name=name)
            row, checks = _measure(lc, path, model, bs, ours, cfg, text_file, threads, check=qtype == "f32")
            speed["llama_cpp_tokens_per_s"][qtype] = row.pop("tokens_per_s")
            out["types"][qtype] = {"size_bytes": exported.size_bytes, "f16_fallback": exported.f16_fallback, **row}
            out["types"][qtype]["delta_bpc"] = row["bpc"] - bpc
            out.update(checks)
            mib = exported.size_bytes / 2**20
            log(f"{name} {qtype}: {mib:.2f} MiB, val bpc {row['bpc']:.4f} ({row['bpc'] - bpc:+.4f} vs ours)")
    return out, speed


def _measure(lc, path: Path, model, bs: int, ours: _Ours, cfg: GGUFConfig, text_file: Path, threads: int, *, check):
    """One export's row (bpc through llama.cpp, llama-perplexity, tokens/s) and, for the f32 one, the checks."""
    checks: dict = {}
    with llamacpp.Session(lc, path, bs, threads=threads) as session:
        nats, count = _nats(session, ours.batches.iterate(64))
        if check:
            first = [int(i) for i in ours.batches.ids[:bs]]
            diff = _logit_diffs(model, session.logits(first), first)
            llama_greedy = session.greedy(ours.prompt, cfg.greedy_tokens)
    if count != ours.count:
        raise GGUFEvalError(f"llama.cpp scored {count} val targets, ours {ours.count}")
    ppl = llamacpp.perplexity(lc, path, text_file, bs, threads=threads)
    n = bs - len(ours.prompt)
    runs = [llamacpp.complete(lc, path, ours.prompt_text, n, bs, threads=threads) for _ in range(cfg.speed_repeats)]
    row = {
        "bpc": nats / (math.log(2) * ours.characters),
        "perplexity": ppl.ppl,
        "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
    }
    if check:
        checks["checks"] = _checks(llamacpp.tokenize(lc, path, ours.val_text), ours, diff, llama_greedy, runs[0], ppl)
    return row, checks


def _checks(theirs_ids: list[int], ours: _Ours, logits_diff: dict, llama_greedy: list[int], completion, ppl) -> dict:
    our_ids = [int(i) for i in ours.batches.ids]
    diff = next((i for i, (a, b) in enumerate(zip(theirs_ids, our_ids, strict=False)) if a != b), None)
    if diff is None and len(theirs_ids) != len(our_ids):
        diff = min(len(theirs_ids), len(our_ids))
    return {
        "tokenization_equal": diff is None,
        "tokenization_first_difference": diff,
        "val_tokens": len(our_ids),
        "logits_max_abs_diff": logits_diff["ours"],
        "logits_max_abs_diff_ggml_gelu": logits_diff.get("ggml_gelu"),
        "greedy_tokens": len(ours.greedy),
        "greedy_equal": ours.greedy == llama_greedy,
        "completion_equal": completion.text == ours.window_text,
        "completion_text": completion.text,
        "perplexity": {
            "n_ctx": ppl.n_ctx,
            "chunks": ppl.chunks,
            "llama_cpp": ppl.ppl,
            "llama_cpp_sd": ppl.ppl_sd,
            "ours": ours.protocol_ppl,
            "ours_ggml_gelu": ours.protocol_ppl_ggml_gelu,
            "targets": ours.protocol_targets,
        },
    }
