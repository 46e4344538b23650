"""Sampling speed with and without the KV cache: ``python -m bench.generate [--run RUN] [--write]``.

Model: a trained run's checkpoint (``--run RUN`` → models/RUN, or ``--model-dir``), else seed
000's 10.7M-parameter Shakespeare GPT (6 layers, 6 heads, n_embd 384, context 256, vocab 65)
freshly initialised: speed does not depend on the weights. It samples ``--new-tokens`` tokens
(default 500, so the sequence outgrows the 256-token window) after a ``--prompt-tokens`` prompt,
for each overflow policy of :func:`lm.generate.stream`, with and without the cache, and checks
that both draw the same tokens from the same seed:

- ``refill``: past block_size the window restarts from its last block_size/2 tokens, so the
  cache is refilled once per block_size/2 tokens. This is where the cache pays off.
- ``slide``: every prediction sees exactly the last block_size tokens; past block_size each
  step recomputes the whole window (learned positions: a rolling cache would be wrong), so the
  cache only helps for the first block_size tokens. Rotary models (``--family llama``) roll the
  cache instead (sliding-window attention, lm.generate.stream), one token's work per step.

MFU counts the model's forward FLOPs per sampled token, (6N + 12·n_layer·n_embd·ctx) / 3 at the
full context (an upper bound while the context is still growing), against the machine's fp32
matmul peak measured by bench.mfu's GEMM probe: at batch 1, sampling is bound by memory and
per-call overhead, not FLOPs, and the uncached path's recomputation is not counted as useful work.

Prints a markdown table; ``--write`` also appends it, with the machine and versions, to
reports/bench.md (not a pipeline output: DVC does not track it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import time
from pathlib import Path

import torch

from bench import append_to_bench
from bench.mfu import flops_per_token, gemm_peak
from lm.families import ModelConfig
from lm.generate import generate


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, ModelConfig, str]:
    """The checkpoint of --run / --model-dir, or the untrained Let's build GPT model; with its config and a
    description."""
    if args.model_dir is not None or args.run is not None:
        from lm import checkpoint

        path = args.model_dir or Path("models") / args.run
        model, run, _ = checkpoint.load(path, args.device)
        return model, run.model, f"{path} ({run.model.family}, trained)"
    from lm.families import LlamaConfig
    from lm.model_size import REFERENCES
    from lm.models import build_model

    ref = REFERENCES["nanogpt-shakespeare-char"]
    cfg, what = ref.model, "nanogpt-shakespeare-char (untrained: 6 layers, 6 heads, n_embd 384, vocab 65)"
    if args.family == "llama":  # the same shape as LLaMA: RMSNorm, rotary (its cache rolls), SwiGLU, no biases
        shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
        cfg, what = (
            LlamaConfig(family="llama", **shape),
            "llama of nanogpt-shakespeare-char's shape (untrained, vocab 65)",
        )
    torch.manual_seed(1337)
    model = build_model(cfg, ref.vocab_size).to(args.device).eval()
    return model, cfg, what


def timed(
    model: torch.nn.Module, prompt: torch.Tensor, n: int, *, use_cache: bool, overflow: str, seed: int
) -> tuple[float, torch.Tensor]:
    """Seconds to sample n tokens (device-synchronised) and the tokens."""
    g = torch.Generator().manual_seed(seed)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompt, n, generator=g, use_cache=use_cache, overflow=overflow)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run", default=None, help="benchmark the checkpoint models/RUN (default: the untrained Let's build GPT model)"
    )
    p.add_argument("--model-dir", type=Path, default=None, help="benchmark this checkpoint directory instead")
    p.add_argument(
        "--family",
        choices=["gpt", "llama"],
        default="gpt",
        help="untrained model without --run: Let's build GPT's model, or a llama of its shape (rotary: 'slide' rolls "
        "the cache)",
    )
    p.add_argument("--new-tokens", type=int, default=500, help="tokens sampled per measurement (default: 500)")
    p.add_argument("--prompt-tokens", type=int, default=1, help="length of the (random) prompt (default: 1)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per setting; the fastest counts (default: 1)")
    p.add_argument(
        "--overflow",
        nargs="+",
        choices=["refill", "slide"],
        default=["refill", "slide"],
        help="overflow policies to measure (default: both)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (default: 1337)")
    p.add_argument("--write", action="store_true", help="append the results to reports/bench.md")
    args = p.parse_args(argv)
    args.error = p.error
    return args


def measure_all(model: torch.nn.Module, prompt: torch.Tensor, args: argparse.Namespace) -> tuple[list, dict]:
    """Every (overflow, cache) setting, the fastest of --repeats each: rows (overflow, cache, tokens/s, seconds)
    and the tokens each drew."""
    rows, tokens = [], {}
    for overflow in args.overflow:
        for use_cache in (True, False):
            best, out = min(
                (
                    timed(model, prompt, args.new_tokens, use_cache=use_cache, overflow=overflow, seed=args.seed)
                    for _ in range(args.repeats)
                ),
                key=lambda r: r[0],
            )
            tokens[overflow, use_cache] = out
            rows.append((overflow, use_cache, args.new_tokens / best, best))
            cache = "cache" if use_cache else "no cache"
            print(f"  {overflow:6s} {cache:8s} {args.new_tokens / best:10.1f} tokens/s", flush=True)
    return rows, tokens


def table(model, cfg, desc: str, rows: list, tokens: dict, args: argparse.Namespace) -> str:
    """The markdown of the measurements, with MFU against the measured fp32 matmul peak."""
    forward_flops = flops_per_token(cfg, model.vocab_size) / 3  # training is 3x forward; per token, full context
    peak = gemm_peak(torch.float32, args.device)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    speed = {(o, c): tps for o, c, tps, _ in rows}
    baseline = speed.get(("slide", False))
    lines = [
        f"### Sampling speed, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{desc}, {n_params:,} parameters, block_size {model.block_size}; {args.new_tokens} new tokens after a "
        f"{args.prompt_tokens}-token prompt, temperature 1, seed {args.seed}; device {args.device}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}; "
        f"best of {args.repeats}. MFU: {forward_flops / 1e6:,.1f} MFLOP per token (forward, full context) against "
        f"the measured fp32 matmul peak of {peak / 1e9:,.0f} GFLOP/s; peak RSS {rss_mb:,.0f} MB.",
        "",
        "| overflow | KV cache | tokens/s | ms/token | MFU | seconds | speedup vs. no cache (same policy) "
        "| speedup vs. slide without cache | same tokens as no cache |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for overflow, use_cache, tps, secs in rows:
        same = torch.equal(tokens[overflow, True], tokens[overflow, False]) if (overflow, False) in tokens else None
        lines.append(
            f"| {overflow} | {'yes' if use_cache else 'no'} | {tps:,.1f} | {1e3 / tps:.2f} | "
            f"{100 * tps * forward_flops / peak:.2f}% | {secs:.2f} | "
            f"{tps / speed[overflow, False]:.2f}x | {f'{tps / baseline:.2f}x' if baseline else 'n/a'} | "
            f"{'yes' if same else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, desc = load_model(args)
    if not model.kv_cache:
        args.error(
            f"{type(model).__name__} has no KV cache: benchmark an attention-family run "
            "(single_head, multi_head, block, gpt)"
        )
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.vocab_size, (1, args.prompt_tokens), generator=g).to(args.device)  # (1, T)
    generate(model, prompt, 8, use_cache=True)  # warm-up: first-call allocations and kernel selection
    generate(model, prompt, 8, use_cache=False)
    rows, tokens = measure_all(model, prompt, args)
    text = table(model, cfg, desc, rows, tokens, args)
    print()
    print(text)
    if args.write:
        print(f"appended to {append_to_bench(text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
