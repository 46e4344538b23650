"""gguf@<run>: export a gpt or llama run as GGUF in every type of params' gguf.<run> and check each with llama.cpp.

python -m stages.gguf RUN --model models/RUN --tokenizers tokenizers --out gguf/models/RUN
    --metrics gguf/metrics/RUN.json --speed gguf/speed/RUN.json
"""

from __future__ import annotations

from pathlib import Path

from stages.common import deterministic, entry, fail, parser, study
from stages.mlflow_run import outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("run", help="the run to export (a key of `gguf` in params)")
    p.add_argument("--model", required=True, type=Path, help="the run's checkpoint, e.g. models/RUN")
    p.add_argument("--tokenizers", required=True, type=Path, help="the tokenizers folder (tokenize stage outputs)")
    p.add_argument("--out", required=True, type=Path, help="folder of the .gguf files, e.g. gguf/models/RUN")
    p.add_argument("--metrics", required=True, type=Path, help="output JSON, e.g. gguf/metrics/RUN.json")
    p.add_argument("--speed", required=True, type=Path, help="generation speeds JSON, e.g. gguf/speed/RUN.json")
    args = p.parse_args(argv)
    params = study(args.params)
    cfg = entry(params.gguf, args.run, "gguf", args.params)
    run, stage = params.runs[args.run], f"gguf@{args.run}"
    tok_dir = args.tokenizers / run.tokenizer
    tags = {"lm.run": args.run, "tokenizer": run.tokenizer, "family": run.model.family}
    tracked = tracker(
        params, stage, {"run": args.run, **cfg.model_dump(mode="json")}, tags=tags,
        deps={"model": args.model, "tokenizer": tok_dir},
        description=f"{args.run} as GGUF ({', '.join(cfg.types)}), checked and measured by llama.cpp",
    )  # fmt: skip

    from lm import llamacpp
    from lm.atomic import OutputError, atomic_dir, write_json
    from lm.checkpoint import CheckpointError
    from lm.export import ExportError
    from lm.gguf_eval import GGUFEvalError, evaluate_gguf

    deterministic()
    with tracked:
        try:
            lc = llamacpp.build()
            with atomic_dir(args.out) as tmp:
                result, speed = evaluate_gguf(args.run, args.model, tok_dir, cfg, tmp, lc)
            write_json(args.metrics, result)
            write_json(args.speed, speed)
        except (ExportError, GGUFEvalError, llamacpp.LlamaCppError, CheckpointError, OutputError) as e:
            fail(f"{stage}: {e}")
        for qtype, row in result["types"].items():
            tracked.log_metrics({f"{qtype}/{k}": v for k, v in row.items() if isinstance(v, int | float)})
        checks = result["checks"]
        tracked.log_metrics({"logits_max_abs_diff": checks["logits_max_abs_diff"], "val/bpc": result["val"]["bpc"]})
        tracked.log_metrics({f"{t}/tokens_per_s": v for t, v in speed["llama_cpp_tokens_per_s"].items()})
        tracked.log_metrics({"ours/tokens_per_s": speed["ours_tokens_per_s"]})
        tracked.log_artifact(args.metrics)
        outputs(tracked, gguf=args.out, metrics=args.metrics, speed=args.speed)
    c, ppl = checks, checks["perplexity"]
    same = lambda ok: "equal" if ok else "DIFFER"  # noqa: E731
    print(
        f"{stage}: logits within {c['logits_max_abs_diff']:.2e}; tokens {same(c['tokenization_equal'])}; "
        f"greedy {c['greedy_tokens']} tokens {same(c['greedy_equal'])}; llama-perplexity "
        f"{ppl['llama_cpp']:.4f} vs ours {ppl['ours']:.4f}"
    )


if __name__ == "__main__":
    main()
