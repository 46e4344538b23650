"""The `lm` command: check params, count parameters, sample from a trained run, export it, classify with a fine-tune.

Heavy libraries (torch, mlflow, datasets) are imported inside the commands, never at module level,
so `lm --help` and `lm check-params` answer at once (tests/test_params.py checks that importing
this module does not import torch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REFERENCE_NAMES = (
    "gpt2-small, gpt2-medium, gpt2-large, gpt2-xl (the Raschka learning journey's settings), llama-3.2-1b, llama-2-7b, "
    "nanogpt-shakespeare-char, bigram-to-transformer-cpu, "
    "journey-wavenet-176k, makemore-wavenet-76k, makemore-mlp, makemore-mlp-bn, makemore-bigram"
)
"""Kept in step with lm.model_size.REFERENCES (a test checks), so --help needs no torch import."""


def _error(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------------------------
# argument types: bad values fail in argparse, before anything heavy is imported


def _number(text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def _checked(kind: type, ok, rule: str):
    """An argparse type: parse `kind`, then require `ok(value)`; the error states `rule`."""

    def parse(text: str):
        v = _number(text, kind)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return v

    return parse


_temperature = _checked(float, lambda v: 0 < v < float("inf"), "must be a finite number > 0 (--top-k 1 is greedy)")
_top_k = _checked(int, lambda v: v >= 1, "must be >= 1 (1 is greedy decoding)")
_top_p = _checked(float, lambda v: 0 < v <= 1, "must lie in (0, 1] (1 keeps every token)")
_positive_int = _checked(int, lambda v: v >= 1, "must be a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "must be >= 0")


# ----------------------------------------------------------------------------------------------
# commands


def _check_params(args: argparse.Namespace) -> int:
    from lm.config import ParamsError, load_params
    from lm.memory import study_error, study_problems

    try:
        study = load_params(args.file)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problems := study_problems(study, args.tokenizers_dir):
        return _error(study_error(args.file, problems), 2)
    print(f"{args.file}: ok ({len(study.corpora)} corpora, {len(study.tokenizers)} tokenizers, {len(study.runs)} runs)")
    return 0


def _params(args: argparse.Namespace) -> int:
    import json

    from lm.model_size import format_report, report_for

    try:
        report = report_for(
            args.name, params=args.params, tokenizers_dir=args.tokenizers_dir, vocab_size=args.vocab_size
        )
    except ValueError as e:
        return _error(str(e), 2)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _find_checkpoint(args: argparse.Namespace) -> Path | None:
    """models/<RUN> (or --model-dir); None after printing an error that lists the trained runs."""
    if args.model_dir is not None:
        if not (args.model_dir / "config.json").is_file():
            _error(f"{args.model_dir} is not a checkpoint directory (no config.json): pass a train stage output")
            return None
        return args.model_dir
    path = args.models_dir / args.run
    if (path / "config.json").is_file():
        return path
    trained = sorted(p.name for p in args.models_dir.glob("*") if (p / "config.json").is_file())
    hint = ""
    try:
        from lm.config import load_params

        if args.run in load_params(args.params).runs:
            hint = f" (it is a run of {args.params}: train it first with `dvc repro train@{args.run}`)"
    except (ValueError, OSError):
        pass
    available = (
        ", ".join(trained) if trained else f"none ({args.models_dir}/ holds no checkpoints: run `dvc repro` first)"
    )
    _error(
        f"unknown run {args.run!r}: no checkpoint {path}/config.json{hint}; available runs: {available}; "
        f"or pass --model-dir DIR",
        2,
    )
    return None


def _sample(args: argparse.Namespace) -> int:
    loaded = _load_for_sampling(args)
    if isinstance(loaded, int):
        return loaded
    model, run, device, tokenizer, stats = loaded
    context = _context(args.prompt, run, tokenizer, stats)
    if isinstance(context, str):
        return _error(context, 2)
    total, seconds, interrupted = _stream_samples(args, model, device, tokenizer, stats, context)
    cache = "KV cache" if model.kv_cache and not args.no_cache else "no cache"
    print(
        ("[interrupted: " if interrupted else "[")
        + f"{total} tokens in {seconds:.2f} s: {total / max(seconds, 1e-9):,.1f} tokens/s on {device}, {cache}]",
        file=sys.stderr,
    )
    return 130 if interrupted else 0


def _load_for_sampling(args: argparse.Namespace):
    """(model on its device, run config, device, tokenizer, tokenizer stats), or the exit code after an error."""
    model_dir = _find_checkpoint(args)
    if model_dir is None:
        return 2

    from lm import checkpoint
    from lm.distributed import pick_device
    from lm.tokenizer import load_stats, load_tokenizer

    try:
        model, run, vocab_size = checkpoint.load(model_dir, "cpu")
        device = pick_device(args.device or run.train.device)
        model.to(device)
    except (checkpoint.CheckpointError, RuntimeError) as e:
        return _error(str(e))
    if args.model_dir is None and (note := _stale_note(args, run)):
        print(note, file=sys.stderr)
    tok_dir = args.tokenizer_dir or args.tokenizers_dir / run.tokenizer
    if not (tok_dir / "tokenizer.json").is_file():
        return _error(
            f"no tokenizer at {tok_dir} (run {run.tokenizer!r} of the checkpoint): run "
            f"`dvc repro tokenize@{run.tokenizer}` or pass --tokenizer-dir DIR"
        )
    tokenizer, stats = load_tokenizer(tok_dir), load_stats(tok_dir)
    if tokenizer.get_vocab_size() != vocab_size:
        return _error(
            f"{tok_dir} has {tokenizer.get_vocab_size()} tokens but the model expects {vocab_size}: "
            "pass the tokenizer the run was trained with (--tokenizer-dir)"
        )
    if args.overflow == "refill" and not model.kv_cache:
        print(f"note: {run.model.family} has no KV cache; --overflow refill does not apply", file=sys.stderr)
    return model, run, device, tokenizer, stats


def _context(prompt: str, run, tokenizer, stats: dict) -> list[int] | str:
    """The token ids sampling starts from, or the error that a bad prompt gets: a name starts after the boundary;
    an empty text prompt starts after a newline, as a fresh paragraph."""
    from lm.tokenizer import BOUNDARY, oov_chars, unk_id

    lines = stats["format"] == "lines"
    missing = oov_chars(tokenizer, [prompt])
    if missing or (unk_id(tokenizer) is not None and "[UNK]" in prompt):
        chars = ", ".join(repr(c) for c in sorted(missing)) or "'[UNK]'"
        return f"the prompt has characters outside the {run.tokenizer} vocabulary: {chars}; remove or replace them"
    if lines and BOUNDARY in prompt:
        return f"the prompt contains the boundary {BOUNDARY!r}, which ends a name: leave it out"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if lines:  # a name starts after the boundary and ends at the next one
        return [stats.get("boundary_id")] + prompt_ids
    return prompt_ids or tokenizer.encode("\n", add_special_tokens=False).ids or [0]


def _stream_samples(args: argparse.Namespace, model, device, tokenizer, stats: dict, context: list[int]):
    """Write --num-samples samples to stdout as they are drawn; return the tokens drawn, the seconds taken and
    whether Ctrl-C stopped it (what was drawn by then is written, ended with a newline)."""
    import signal

    import torch

    from lm.generate import PASSAGE_SEPARATOR, TextStream, stream

    lines, boundary = stats["format"] == "lines", stats.get("boundary_id")
    g = torch.Generator().manual_seed(args.seed)
    out = sys.stdout
    total, t0 = 0, time.perf_counter()
    # Ctrl-C sets a flag the loop reads after each token, rather than raising KeyboardInterrupt wherever the
    # interpreter happens to be: raised inside torch's generator wrapper or a write, it could be lost, and the
    # sampling went on.
    asked: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))
    try:
        for i in range(args.num_samples):
            if i and not lines:
                out.write(PASSAGE_SEPARATOR.removeprefix("\n"))  # the previous sample ended with a newline
            out.write(args.prompt)
            out.flush()
            text = TextStream(tokenizer, context)
            tokens = stream(
                model, torch.tensor([context], device=device), args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, generator=g, use_cache=not args.no_cache and model.kv_cache,
                overflow=args.overflow,
            )  # fmt: skip
            for nxt in tokens:
                if asked:
                    break
                total += 1
                if lines and int(nxt) == boundary:
                    break
                out.write(text.push(int(nxt)))
                out.flush()
            out.write(text.flush() + "\n")
            out.flush()
            if asked:
                break
    finally:
        signal.signal(signal.SIGINT, previous)
    return total, time.perf_counter() - t0, bool(asked)


def _verify(args: argparse.Namespace) -> int:
    """Judge the working tree's pipeline outputs against those committed at --rev (lm/verify.py)."""
    import subprocess

    from lm.config import ParamsError, load_params
    from lm.verify import report, verify

    try:
        study = load_params(args.params)
    except ParamsError as e:
        return _error(str(e), 2)
    try:
        verdict = verify(study, Path.cwd(), args.rev)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        return _error(f"lm verify compares with git: run it in a clone of the study ({e})", 2)
    print(report(verdict))
    return 0 if verdict.ok else 1


def _ui(args: argparse.Namespace) -> int:
    """Print the runs table's URL and a link per question of docs/mlflow.md, then serve the MLflow UI on the
    project's store (until Ctrl-C), opening one of the links with --open."""
    import os
    import subprocess

    from lm.config import ParamsError, load_params
    from lm.tracking import runs_table_url

    try:
        cfg = load_params(args.params)
    except ParamsError as e:
        return _error(str(e), 2)
    experiment = cfg.tracking.experiment
    corpus = args.corpus or ("shakespeare" if "shakespeare" in cfg.corpora else next(iter(cfg.corpora), ""))
    if args.corpus and args.corpus not in cfg.corpora:
        return _error(f"--corpus {args.corpus}: {args.params} has the corpora {', '.join(cfg.corpora)}", 2)
    store = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if args.screenshots is not None:
        from lm.ui import screenshots

        try:
            for path in screenshots(store, experiment, args.screenshots, corpus=corpus, pair=tuple(args.pair)):
                print(f"wrote {path}")
        except (ValueError, OSError) as e:
            return _error(str(e))
        return 0
    url = f"http://{args.host}:{args.port}"
    print(f"Runs table of {experiment!r}: {runs_table_url(store, experiment, url)}", flush=True)
    links = _question_links(store, experiment, url, corpus, tuple(args.pair))
    if args.open and args.open not in links:
        return _error(f"--open {args.open}: the store has no runs for that view yet (run `make repro` first)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: it serves GenAI jobs only
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--workers", "1", "--host", args.host,
           "--port", str(args.port)]  # fmt: skip
    server = subprocess.Popen(cmd, env=env)
    try:
        if args.open:
            import webbrowser

            from lm.ui import wait_for

            wait_for(f"{url}/health", 120)
            if not webbrowser.open(links[args.open]):
                print(f"no browser to open here: open {links[args.open]}", file=sys.stderr)
        return server.wait()
    except (KeyboardInterrupt, TimeoutError) as e:
        server.terminate()
        server.wait()
        return _error(str(e)) if isinstance(e, TimeoutError) else 0


def _question_links(store: str, experiment: str, ui: str, corpus: str, pair: tuple[str, str]) -> dict[str, str]:
    """Print a link per question of docs/mlflow.md (lm.ui.views: what each shows), and return them by name."""
    from lm.ui import views

    try:
        urls = views(store, experiment, ui, corpus, pair)
    except ValueError as e:  # no experiment yet, or not the pair's runs
        if "no finished train runs" not in str(e):
            print(f"note: {e}")
            return {}
        urls = views(store, experiment, ui, corpus, None)
        print(f"note: {e}: pass --pair RUN RUN for the third link")
    labels = {
        "best": "1. Which family is best? Evaluate runs by val/bpc",
        "curves": f"2. How did the losses evolve? {corpus}'s train runs' bits-per-character curves",
        "diff": f"3. What differs between {pair[0]} and {pair[1]}? Their train runs compared (Show diff only)",
    }
    links = {name.removesuffix(".png"): url for name, url in urls.items() if name}
    for name, link in links.items():
        print(f"{labels[name]}:\n   {link}")
    return links


def _stale_note(args: argparse.Namespace, trained) -> str | None:
    """A note when the checkpoint of RUN was trained with other settings than RUN in the params file now has
    (edited since the last `dvc repro`): the sample comes from the old model."""
    from lm.config import ParamsError, load_params
    from lm.tracking import flatten

    try:
        current = load_params(args.params).runs.get(args.run)
    except (ParamsError, OSError):
        return None
    if current is None:
        return None
    if current.train.dtype == "auto":  # the checkpoint records what auto resolved to, on the machine that trained it
        current = current.model_copy(update={"train": current.train.model_copy(update={"dtype": trained.train.dtype})})
    if current == trained:
        return None
    old, new = flatten(trained.model_dump(mode="json")), flatten(current.model_dump(mode="json"))
    diff = [
        f"{k} {old.get(k, '-')} → {new.get(k, '-')}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return (
        f"note: {args.models_dir / args.run} was trained with other settings than runs.{args.run} in {args.params} "
        f"now has ({'; '.join(diff[:3])}{more}): sampling the trained model; `dvc repro` retrains it"
    )


def _export(args: argparse.Namespace) -> int:
    if args.type is not None and args.format != "gguf":
        return _error("--type applies to --format gguf only (a Hugging Face export is float32)", 2)
    model_dir = _find_checkpoint(args)
    if model_dir is None:
        return 2
    from lm import gguf_export
    from lm.checkpoint import CheckpointError, load
    from lm.export import ExportError, check_target, export_hf, gpt2_problems

    gguf = args.format == "gguf"
    try:  # before any work: nothing of the user's is replaced
        (gguf_export.check_gguf_target if gguf else check_target)(args.out, args.force, [model_dir])
        _, run, _ = load(model_dir)
    except ExportError as e:
        return _error(str(e), 2)
    except CheckpointError as e:
        return _error(str(e))
    what = "GGUF" if gguf else "Hugging Face GPT-2"
    if gguf:
        problems = gguf_export.gguf_problems(run)
    else:  # a llama run exports as Hugging Face Llama whatever its shape
        problems = [] if run.model.family == "llama" else gpt2_problems(run)
    if problems:
        return _error(f"{model_dir} cannot be exported as {what}:\n" + "\n".join(f"  {p}" for p in problems), 2)
    if (tok_dir := _tokenizer_dir(args, run)) is None:
        return 1
    try:
        if gguf:
            done = gguf_export.export_gguf(model_dir, tok_dir, args.out, args.type or "f32")
        else:
            out = export_hf(model_dir, tok_dir, args.out, force=args.force)
    except (ExportError, CheckpointError, OSError) as e:
        return _error(str(e))
    print(_exported_gguf(done, run) if gguf else _exported_hf(out, run))
    return 0


def _exported_hf(out: Path, run) -> str:
    hf_class = "LlamaForCausalLM" if run.model.family == "llama" else "GPT2LMHeadModel"
    return (
        f"wrote {out}/ (config.json, model.safetensors, generation_config.json, tokenizer.json, "
        f"tokenizer_config.json); load it with transformers.{hf_class}.from_pretrained({str(out)!r}) "
        "and AutoTokenizer.from_pretrained(...)"
    )


def _exported_gguf(done, run) -> str:
    fallback = f"; {len(done.f16_fallback)} tensors in f16 (rows not whole blocks of 32)" if done.f16_fallback else ""
    return (
        f"wrote {done.path} ({done.architecture}, {done.qtype}{fallback}, {done.size_bytes / 2**20:.2f} MiB; "
        f"end-of-text token {done.eos_id}); run it with llama.cpp, e.g. llama-completion -m {done.path} "
        f"-p TEXT -n 40 -c {run.model.block_size} --top-k 1 (docs/gguf.md)"
    )


def _tokenizer_dir(args: argparse.Namespace, run) -> Path | None:
    """The run's tokenizer folder (--tokenizer-dir, else TOKENIZERS_DIR/<its tokenizer>), or None after saying how
    to build it."""
    tok_dir = args.tokenizer_dir or args.tokenizers_dir / run.tokenizer
    if (tok_dir / "tokenizer.json").is_file():
        return tok_dir
    _error(f"no tokenizer at {tok_dir}: run `dvc repro tokenize@{run.tokenizer}` or pass --tokenizer-dir DIR")
    return None


# ----------------------------------------------------------------------------------------------
# the parser


def _checkpoint_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("run", metavar="RUN", help="run name: its checkpoint is models/RUN (a train stage output)")
    c.add_argument(
        "--models-dir", type=Path, default=Path("models"), help="folder of the checkpoints (default: models)"
    )
    c.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint directory to use instead of MODELS_DIR/RUN (model.safetensors + config.json)",
    )
    c.add_argument(
        "--tokenizers-dir",
        type=Path,
        default=Path("tokenizers"),
        help="folder of the tokenizers (default: tokenizers); the run's own is TOKENIZERS_DIR/<its tokenizer>",
    )
    c.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=None,
        help="tokenizer directory to use instead (tokenizer.json + stats.json of a tokenize stage)",
    )
    c.add_argument(
        "--params",
        default="params.yaml",
        help="params file, only read to tell an untrained run from an unknown one (default: params.yaml)",
    )


def _add_check_params(sub) -> None:
    c = sub.add_parser(
        "check-params",
        help="validate a params file and print one line per problem",
        description="Validate the whole params file (unknown keys, ranges, cross-references) without running anything. "
        "Also refuses a run whose training cannot fit in this machine's memory (parameters counted on the meta "
        "device; lm/memory.py). Exit status 0 when valid, 2 otherwise.",
    )
    c.add_argument("file", nargs="?", default="params.yaml", help="params file (default: params.yaml)")
    c.add_argument("--tokenizers-dir", type=Path, default=Path("tokenizers"),
                   help="built tokenizers, for the memory check's vocabulary sizes (default: tokenizers)")  # fmt: skip
    c.set_defaults(func=_check_params)


def _add_params(sub) -> None:
    c = sub.add_parser(
        "params",
        help="parameter counts and shares by component, sizes and training FLOPs of a run or reference model",
        description="Count the parameters of a run of the params file or of a reference configuration, built on "
        "the meta device (no memory, so gpt2-xl is instant): counts and shares by component (token embedding, "
        "position embedding, attention, feed-forward, norm, head, other), per transformer block and in total; "
        "for gpt both with the LM head untied and tied to the token embedding; sizes in MB (2**20 bytes) in fp32 "
        "and bf16; training FLOPs per token = 6N + 12*n_layer*n_embd*ctx (PaLM appendix B) with N = every "
        "parameter except the token and position embedding lookups (the LM head's matrix counts, tied or not).",
        epilog=f"reference configurations: {REFERENCE_NAMES}.",
    )
    c.add_argument("name", metavar="RUN", help="a run of the params file, or a reference configuration (listed below)")
    c.add_argument("--params", default="params.yaml", help="params file to look runs up in (default: params.yaml)")
    c.add_argument(
        "--tokenizers-dir",
        default="tokenizers",
        help="where the run's vocabulary size is read: TOKENIZERS_DIR/<tokenizer>/stats.json (default: tokenizers)",
    )
    c.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=None,
        help="vocabulary size to count with; needed for a run whose tokenizer is not built yet, and "
        "overrides stats.json (and a reference's vocabulary) when given",
    )
    c.add_argument(
        "--json", action="store_true", help="print JSON (every view, per block, sizes, FLOPs) instead of the table"
    )
    c.set_defaults(func=_params)


def _add_sample(sub) -> None:
    c = sub.add_parser(
        "sample",
        help="stream text sampled from a trained run",
        description="Load models/RUN and its tokenizer and stream sampled text to stdout as it is produced (a "
        "summary with tokens/s goes to stderr). Names corpora: each sample is one name, stopped at the boundary. "
        "The attention families (single_head, multi_head, block, gpt) sample with a KV cache: the prompt is "
        "prefilled once, then each step feeds one token. Every prediction uses at most the model's block_size "
        "tokens; see --overflow for what happens beyond it.",
    )
    _checkpoint_options(c)
    c.add_argument(
        "--prompt",
        default="",
        help="text to continue (default: empty: a fresh paragraph, or a new name); "
        "characters outside a char vocabulary are an error",
    )
    c.add_argument(
        "--max-new-tokens",
        type=_non_negative_int,
        default=500,
        help="tokens to sample per sample (default: 500; names stop earlier at the boundary)",
    )
    _sampling_options(c)
    c.set_defaults(func=_sample)


def _sampling_options(c: argparse.ArgumentParser) -> None:
    """`lm sample`'s options of how tokens are drawn and where the model runs."""
    c.add_argument(
        "--temperature",
        type=_temperature,
        default=1.0,
        help="softmax temperature, > 0: below 1 sharper, above 1 flatter (default: 1.0)",
    )
    c.add_argument(
        "--top-k",
        type=_top_k,
        default=None,
        help="sample only among the K most likely tokens, K >= 1 (1 = greedy; default: all)",
    )
    c.add_argument(
        "--top-p",
        type=_top_p,
        default=None,
        help="nucleus sampling: only the most likely tokens whose probabilities sum to P, 0 < P <= 1 (default: all)",
    )
    c.add_argument(
        "--seed", type=int, default=1337, help="seed of the sampling generator: same seed, same text (default: 1337)"
    )
    c.add_argument("--num-samples", type=_positive_int, default=1, help="independent samples to draw (default: 1)")
    c.add_argument(
        "--device",
        choices=["cpu", "cuda", "mps", "auto"],
        default=None,
        help="where the model runs (default: the run's train.device, 'auto' unless set: cuda, then mps, then "
        "cpu); the draws use a CPU generator, so a seed gives the same text everywhere up to float rounding",
    )
    c.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole window every step instead of using the KV cache (same tokens, slower)",
    )
    c.add_argument(
        "--overflow",
        choices=["slide", "refill"],
        default="slide",
        help="past block_size tokens: 'slide' (default) predicts from exactly the last block_size tokens, "
        "recomputing the window every step (learned positions make a rolling cache wrong); 'refill' "
        "restarts the window from the last block_size/2 tokens and refills the cache once, then "
        "grows it again (fast with the cache; context between block_size/2 and block_size)",
    )


def _add_export(sub) -> None:
    c = sub.add_parser(
        "export",
        help="export a gpt or llama run as a Hugging Face directory or a GGUF file for llama.cpp",
        description="Write a directory that transformers.GPT2LMHeadModel.from_pretrained(DIR) (llama runs: "
        "LlamaForCausalLM) and AutoTokenizer.from_pretrained(DIR) load offline: config.json, model.safetensors "
        "(GPT-2 names, Conv1D weights transposed, zero biases where the run has none; or Llama's names, q/k/v "
        "split), generation_config.json, tokenizer.json, tokenizer_config.json. Only gpt runs with GPT-2's shape "
        "(pre-norm LayerNorm blocks, learned positions, a 4x GELU feed-forward, no LM head bias) export as GPT-2; "
        "others are refused with the reason. transformers is not needed to export. --format gguf writes one GGUF file "
        "(llama.cpp's gpt2 graph for gpt runs, its llama graph for llama runs, the tokenizer inside) that llama.cpp's "
        "tools run (docs/gguf.md).",
    )
    _checkpoint_options(c)
    c.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default="hf",
        help="'hf' (a Hugging Face directory, the default) or 'gguf' (one file for llama.cpp; docs/gguf.md)",
    )
    c.add_argument(
        "--type",
        choices=["f32", "f16", "q8_0", "q4_0"],
        default=None,
        help="gguf only: the matrices' type (default f32; norms and biases stay f32; q8_0/q4_0 rows that are not "
        "whole blocks of 32 fall back to f16)",
    )
    c.add_argument(
        "--out",
        type=Path,
        required=True,
        help="hf: directory to write; gguf: the .gguf file. An earlier export there is replaced atomically, "
        "anything else is refused",
    )
    c.add_argument(
        "--force", action="store_true", help="replace --out even if it is a file or a folder that is not an lm export"
    )
    c.set_defaults(func=_export)


def _classify(args: argparse.Namespace) -> int:
    """Label each message with a fine-tuned classifier: one line each, label, probability, message."""
    texts = list(args.text or [])
    if any(not t.strip() for t in texts):
        return _error('--text is empty: give the message to classify, e.g. --text "WINNER! Claim your prize"', 2)
    if args.file is not None:
        try:
            texts += [line for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            return _error(f"cannot read --file {args.file}: {e}; pass a UTF-8 text file, one message a line", 2)
    if not texts:
        return _error('no message to classify: pass --text "..." or --file FILE (one message a line)', 2)
    folder = args.model_dir or args.finetune_dir / args.name
    if not folder.is_dir():
        if (Path("models") / args.name).is_dir():
            return _error(
                f"{args.name!r} is a language model of the ladder, not a fine-tuned classifier: add a `finetune` "
                "entry for it in params.yaml, run `make finetune`, and pass that entry's name",
                2,
            )
        return _error(
            f"no fine-tuned classifier at {folder}: run `make finetune` (or `dvc repro finetune@{args.name}`) or "
            "pass --model-dir DIR",
            2,
        )

    from lm.finetune import FinetuneError, load_classifier, predict

    try:
        model, enc, labels = load_classifier(folder)
        probs = predict(model, enc.batch(texts))
    except (FinetuneError, OSError, ValueError) as e:
        return _error(str(e))
    for text, p in zip(texts, probs.tolist(), strict=True):
        best = max(range(len(labels)), key=p.__getitem__)
        print(f"{labels[best]}\t{p[best]:.4f}\t{text}")
    return 0


def _llama_cpp(args: argparse.Namespace) -> int:
    from lm import llamacpp

    try:
        lc = llamacpp.build(jobs=args.jobs, log=lambda m: print(m, file=sys.stderr))
    except (llamacpp.LlamaCppError, OSError) as e:
        return _error(str(e))
    print(lc.bin)
    return 0


def _add_llama_cpp(sub) -> None:
    c = sub.add_parser(
        "llama-cpp",
        help="build llama.cpp's tools once (from the pinned llama-cpp-python sdist) and print their folder",
        description="Download the pinned llama-cpp-python sdist with pip (its sha256 checked), build llama.cpp's "
        "llama-tokenize, llama-perplexity and llama-completion and libllama with CMake into .cache/llama.cpp/ "
        "(LM_LLAMA_CPP_DIR overrides; LM_LLAMA_CPP_SDIST names a local sdist), and print the folder of the tools. "
        "A finished build is reused: the second call prints at once. docs/gguf.md shows the tools on an export.",
    )
    c.add_argument("--jobs", type=_positive_int, default=None, help="parallel compile jobs (default: every core)")
    c.set_defaults(func=_llama_cpp)


def _add_classify(sub) -> None:
    c = sub.add_parser(
        "classify",
        help="label messages with a fine-tuned classifier (a `finetune` entry, after `make finetune`)",
        description="Print one line per message: the label, its probability and the message (tab-separated). The "
        "classifier is finetune/models/NAME (or --model-dir); messages come from --text (repeatable) and --file (one "
        "message a line, empty lines skipped). Longer messages are cut as the classifier was trained (max_length, "
        "truncation_side); characters its tokenizer lacks become its unknown id.",
    )
    c.add_argument("name", help="a fine-tune's name (a key of `finetune` in params.yaml), e.g. sms-oz-bpe-all")
    c.add_argument("--text", action="append", help="a message to classify (repeat for more)")
    c.add_argument("--file", type=Path, default=None, help="a UTF-8 text file, one message a line")
    c.add_argument("--finetune-dir", type=Path, default=Path("finetune/models"),
                   help="where the fine-tuned classifiers are (default: finetune/models)")  # fmt: skip
    c.add_argument("--model-dir", type=Path, default=None, help="the classifier's folder itself (overrides NAME)")
    c.set_defaults(func=_classify)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lm",
        description="A reproducible study of language models, from a bigram table to a GPT. "
        "`dvc repro` runs the pipeline; this command inspects and uses what it produced.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_check_params(sub)
    _add_params(sub)
    _add_sample(sub)
    _add_export(sub)
    _add_classify(sub)
    _add_llama_cpp(sub)
    c = sub.add_parser(
        "verify",
        help="did the study reproduce here? every committed number against this checkout's, within tolerance",
        description="Compare every run's metrics and curve in the working tree with the committed ones (git), with "
        "the tolerance the case calls for: bit-identical on the machine class that made the commit "
        "(reports/machine.json), else per run as lm/verify.py derives it; then the study's conclusions. Prints one "
        "table; exit status 1 names each number or conclusion beyond tolerance. Compares only: run `dvc repro` "
        "first (`make verify` does both).",
    )
    c.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    c.add_argument("--rev", default="HEAD", help="the commit to compare with (default: HEAD)")
    c.set_defaults(func=_verify)
    c = sub.add_parser(
        "ui",
        help="serve the MLflow UI on the project's store and print the links that answer the study's questions",
        description="Print the URL of the runs table of tracking.experiment (the ML view: MLflow 3 opens new "
        "experiments on its GenAI overview) and a link per question of docs/mlflow.md (which family is best, how "
        "the losses evolved, what differs between two runs), and serve `mlflow ui` on MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db of the current directory, until Ctrl-C.",
    )
    c.add_argument(
        "--params", default="params.yaml", help="params file (its tracking.experiment; default: params.yaml)"
    )
    c.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    c.add_argument("--port", type=_positive_int, default=5000, help="port (default: 5000)")
    c.add_argument("--corpus", default=None, help="the corpus of the curves link (default: shakespeare, or the first)")
    c.add_argument("--pair", nargs=2, default=["names-mlp", "names-mlp-bn"], metavar="RUN",
                   help="the two runs of the diff link (default: names-mlp names-mlp-bn)")  # fmt: skip
    c.add_argument("--open", choices=["best", "curves", "diff"], default=None,
                   help="open that link in the browser once the UI answers")  # fmt: skip
    c.add_argument(
        "--screenshots",
        type=Path,
        default=None,
        metavar="DIR",
        help="instead of serving, write PNGs of the README's three views into DIR (needs chromium)",
    )
    c.set_defaults(func=_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C anywhere else (loading a model, ...): one line, the shell's code for SIGINT
        print(f"lm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
