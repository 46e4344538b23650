"""evaluate@<run>: score the checkpoint on the whole val (and test) split, sample, write metrics JSON."""

from __future__ import annotations

from pathlib import Path

from stages.common import deterministic, entry, fail, parser, study
from stages.mlflow_run import describe, outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser("Evaluate one trained run: loss, ppl, bpc on full splits, samples, parameter distribution.")
    p.add_argument("run", help="run name (a key of `runs`)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (train stage output)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (tokenize stage output)")
    p.add_argument("--metrics", required=True, type=Path, help="metrics JSON to write")
    p.add_argument("--samples", required=True, type=Path, help="samples text file to write")
    p.add_argument("--inside", required=True, type=Path, help="safetensors file of the arrays the report draws")
    p.add_argument("--log-only", action="store_true", help="log the written outputs to MLflow again; score nothing")
    args = p.parse_args(argv)
    cfg = study(args.params)
    entry(cfg.runs, args.run, "run", args.params)
    if args.log_only and not (args.metrics.is_file() and args.samples.is_file()):
        fail(f"evaluate@{args.run}: --log-only needs a finished evaluation's {args.metrics} and {args.samples}")

    run, stage = cfg.runs[args.run], f"evaluate@{args.run}"
    corpus = cfg.tokenizers[run.tokenizer].corpus
    # The run's params too, so evaluate runs compare by lr, n_embd, ... next to their metrics in the UI.
    params = {"corpus": corpus, **run.model_dump(mode="json"), "evaluate": cfg.evaluate.model_dump(mode="json")}
    tracked = tracker(
        cfg,
        stage,
        params,
        deps={"model": args.model, "tokenizer": args.tokenizer},
        description=describe(cfg, args.run),
        tags={"lm.run": args.run, "corpus": corpus, "tokenizer": run.tokenizer, "family": run.model.family}
        | ({"lm.relogged": "true"} if args.log_only else {}),
        relog=True,
    )

    from lm.checkpoint import CheckpointError
    from lm.evaluate import evaluate_run, log_outputs

    if args.log_only:
        with tracked:
            log_outputs(tracked, args.metrics, args.samples)
            outputs(tracked, metrics=args.metrics, samples=args.samples, inside=args.inside)
        print(f"evaluate@{args.run}: logged again from {args.metrics} and {args.samples}")
        return

    deterministic()
    with tracked:
        try:
            m = evaluate_run(
                args.run,
                args.model,
                args.tokenizer,
                cfg.evaluate,
                args.metrics,
                args.samples,
                args.inside,
                logger=tracked,
            )
        except (CheckpointError, ValueError, RuntimeError, OSError) as e:  # RuntimeError: the run's device is missing
            fail(f"{stage}: {e}")
        outputs(tracked, metrics=args.metrics, samples=args.samples, inside=args.inside)
    print(f"evaluate@{args.run}: val loss {m['val/loss']:.4f}, ppl {m['val/ppl']:.2f}, bpc {m['val/bpc']:.4f}")


if __name__ == "__main__":
    main()
