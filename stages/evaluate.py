"""evaluate@<run>: score the checkpoint on the whole val (and test) split, sample, write metrics JSON."""

from __future__ import annotations

from pathlib import Path

from stages.common import fail, parser, study


def main(argv: list[str] | None = None) -> None:
    p = parser("Evaluate one trained run: loss, ppl, bpc on full splits, samples, parameter distribution.")
    p.add_argument("run", help="run name (a key of `runs`)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (train stage output)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (tokenize stage output)")
    p.add_argument("--metrics", required=True, type=Path, help="metrics JSON to write")
    p.add_argument("--samples", required=True, type=Path, help="samples text file to write")
    args = p.parse_args(argv)
    cfg = study(args.params)
    if args.run not in cfg.runs:
        fail(f"unknown run {args.run!r}; available: {', '.join(sorted(cfg.runs)) or '(none)'}", 2)

    from lm.checkpoint import CheckpointError
    from lm.pipeline import evaluate_run

    try:
        m = evaluate_run(args.run, args.model, args.tokenizer, cfg.evaluate, args.metrics, args.samples)
    except (CheckpointError, ValueError, OSError) as e:
        fail(f"evaluate@{args.run}: {e}")
    print(f"evaluate@{args.run}: val loss {m['val/loss']:.4f}, ppl {m['val/ppl']:.2f}, bpc {m['val/bpc']:.4f}")


if __name__ == "__main__":
    main()
