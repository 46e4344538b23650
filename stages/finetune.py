"""finetune@<name>: make a classifier of a labelled corpus from a trained run, score it, write its outputs.

    python -m stages.finetune NAME --model models/RUN --tokenizers tokenizers --data data/CORPUS
        --out finetunes/NAME --curve curves/finetune-NAME.csv --metrics metrics/finetune-NAME.json

The run's tokenizer is tokenizers/<the run's tokenizer> (params). Resumable: kill it and run it again, it continues
from the last saved state of each seed (lm/finetune.py).
"""

from __future__ import annotations

from pathlib import Path

from stages.common import deterministic, entry, fail, parser, pretrained_inputs, study
from stages.mlflow_run import outputs, pretrained_tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("name", help="fine-tune name (a key of `finetune` in params)")
    pretrained_inputs(p)
    p.add_argument("--out", required=True, type=Path, help="output folder of the classifier")
    p.add_argument("--curve", required=True, type=Path, help="training curve CSV to write")
    p.add_argument("--metrics", required=True, type=Path, help="metrics JSON to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    params = study(args.params)
    cfg = entry(params.finetune, args.name, "fine-tune", args.params)
    run, stage = params.runs[cfg.run], f"finetune@{args.name}"
    tok_dir = args.tokenizers / run.tokenizer
    labels = params.corpora[cfg.corpus].labels or []
    logged = {"finetune": args.name, **cfg.model_dump(mode="json"), "model": run.model.model_dump(mode="json")}
    what = f"{cfg.run} fine-tuned to classify {cfg.corpus} ({cfg.trainable} trained, {cfg.init} init)"
    tracked = pretrained_tracker(params, stage, logged, cfg, args, what)

    from lm.atomic import Busy, OutputError
    from lm.checkpoint import CheckpointError
    from lm.data import DataError, load_labelled
    from lm.finetune import FinetuneError, finetune_run
    from lm.provenance import code_digests
    from lm.tracking import numeric_leaves
    from lm.trainer import DivergedError, Interrupted

    deterministic()
    with tracked:
        try:
            splits = load_labelled(args.data)
            m = finetune_run(
                args.name, cfg, run, args.model, tok_dir, splits, labels, args.out, args.curve, args.metrics,
                logger=tracked, progress=not args.no_progress,
                code=code_digests(__spec__.name if __spec__ else "stages.finetune"),
            )  # fmt: skip
        except Interrupted as e:
            fail(f"{stage}: {e}", 130)
        except (DataError, FinetuneError, CheckpointError, DivergedError, Busy, OutputError, OSError) as e:
            fail(f"{stage}: {e}")
        tracked.log_metrics(numeric_leaves(m["splits"], "") | numeric_leaves(m["seeds"], "seeds"))
        tracked.log_artifact(args.metrics)
        tracked.log_artifact(args.curve, name="curve.csv")
        outputs(tracked, model=args.out, curve=args.curve, metrics=args.metrics)
    test = m["splits"].get("test") or m["splits"]["val"]
    s = m["seeds"]
    print(
        f"{stage}: {m['trained_params']:,} of {m['params']:,} params trained, step {m['selected_step']} kept → test "
        f"accuracy {test['accuracy']:.4f}, F1 {test.get('f1', test['macro_f1']):.4f}; over {len(s['seeds'])} seeds "
        f"{s['mean']:.4f} ± {s['sd']:.4f}"
    )


if __name__ == "__main__":
    main()
