"""Train and score the classical baseline of a labelled corpus: TF-IDF n-grams + logistic regression.

    python -m stages.baseline NAME --data data/CORPUS --metrics metrics/baseline-NAME.json [--params params.yaml]

Writes accuracy, precision, recall, F1 and the confusion matrix of train, val and test (lm/classification.py).
"""

from __future__ import annotations

from pathlib import Path

from lm.atomic import OutputError, write_json
from lm.classification import fit_baseline, score_splits
from lm.data import DataError, load_labelled
from lm.tracking import numeric_leaves
from stages.common import entry, fail, parser, study
from stages.mlflow_run import outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("name", help="baseline name (a key of `baselines` in params)")
    p.add_argument("--data", required=True, type=Path, help="the labelled corpus folder, e.g. data/sms")
    p.add_argument("--metrics", required=True, type=Path, help="output JSON, e.g. metrics/baseline-sms-tfidf.json")
    args = p.parse_args(argv)
    params = study(args.params)
    cfg = entry(params.baselines, args.name, "baseline", args.params)
    labels = params.corpora[cfg.corpus].labels or []
    tracked = tracker(
        params,
        f"baseline@{args.name}",
        {"baseline": args.name, "seed": params.seed, **cfg.model_dump(mode="json")},
        tags={"corpus": cfg.corpus, "family": "tfidf-logreg"},
        deps={"data": args.data},
        description=f"TF-IDF ({cfg.analyzer} {cfg.ngram_min}-{cfg.ngram_max}-grams) + logistic regression on "
        f"{cfg.corpus}",
    )
    with tracked:
        try:
            splits = load_labelled(args.data)
        except DataError as e:
            fail(f"{args.name}: {e}")
        model, tried = fit_baseline(splits, cfg, params.seed)
        chosen = model[-1].C
        result = {
            "baseline": args.name,
            "corpus": cfg.corpus,
            "labels": labels,
            "C": {"tried": {f"{c:g}": acc for c, acc in tried.items()}, "chosen": chosen},
            "features": len(model[0].vocabulary_),
            "splits": score_splits(model.predict, splits, labels),
        }
        try:
            write_json(args.metrics, result)
        except OutputError as e:
            fail(f"{args.name}: {e}")
        tracked.log_metrics(numeric_leaves(result["splits"], ""))
        tracked.log_artifact(args.metrics)
        outputs(tracked, metrics=args.metrics)
    test = result["splits"].get("test") or result["splits"]["val"]
    print(
        f"{args.name}: C={chosen:g} ({result['features']:,} features) → test accuracy {test['accuracy']:.4f}, "
        f"F1 {test.get('f1', test['macro_f1']):.4f} on {test['examples']} messages → {args.metrics}"
    )


if __name__ == "__main__":
    main()
