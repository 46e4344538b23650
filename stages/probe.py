"""probe@<name>: per-layer linear probes of a trained run and of its random-init twin on a labelled corpus.

python -m stages.probe NAME --model models/RUN --tokenizers tokenizers --data data/CORPUS
    --out finetune/probes/NAME.json
"""

from __future__ import annotations

from pathlib import Path

from stages.common import deterministic, entry, fail, parser, pretrained_inputs, study
from stages.mlflow_run import outputs, pretrained_tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("name", help="probe name (a key of `probes` in params)")
    pretrained_inputs(p)
    p.add_argument("--out", required=True, type=Path, help="output JSON, e.g. finetune/probes/NAME.json")
    args = p.parse_args(argv)
    params = study(args.params)
    cfg = entry(params.probes, args.name, "probe", args.params)
    run, stage = params.runs[cfg.run], f"probe@{args.name}"
    tok_dir = args.tokenizers / run.tokenizer
    tracked = pretrained_tracker(
        params, stage, {"probe": args.name, **cfg.model_dump(mode="json")}, cfg, args,
        f"linear probes of every layer of {cfg.run} (and its random init) on {cfg.corpus}",
    )  # fmt: skip

    from lm.atomic import OutputError, write_json
    from lm.checkpoint import CheckpointError
    from lm.data import DataError, load_labelled
    from lm.finetune import FinetuneError
    from lm.probe import probe_run

    deterministic()
    with tracked:
        try:
            splits = load_labelled(args.data)
            result = probe_run(args.name, cfg, run, args.model, tok_dir, splits, params.corpora[cfg.corpus].labels)
            write_json(args.out, result)
        except (DataError, FinetuneError, CheckpointError, OutputError, ValueError) as e:
            fail(f"{stage}: {e}")
        for init, layers in result["models"].items():
            for i, layer in enumerate(layers):
                tracked.log_metrics({f"{init}/test_accuracy": layer["test"], f"{init}/val_accuracy": layer["val"]}, i)
        tracked.log_artifact(args.out)
        outputs(tracked, probes=args.out)
    best = {init: max(layers, key=lambda r: r["val"]) for init, layers in result["models"].items()}
    print(f"{stage}: " + "; ".join(
        f"{init} best on val: layer {layers.index(b)} (test {b['test']:.4f})"
        for (init, layers), b in zip(result["models"].items(), best.values(), strict=True)
    ))  # fmt: skip


if __name__ == "__main__":
    main()
