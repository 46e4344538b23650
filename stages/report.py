"""report: the run table and figures of the whole ladder → reports/README.md, reports/figures/*.png."""

from __future__ import annotations

from pathlib import Path

from lm.classification import metrics_stem
from stages.common import fail, parser, study
from stages.mlflow_run import outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser("Write the study report (markdown tables, figures, samples) from the files every run's stages wrote.")
    for arg, what in [
        ("metrics", "metrics JSON"),
        ("curves", "curve CSV"),
        ("inside", "figure-array (safetensors)"),
        ("models", "training-health (models/<run>/health.json)"),
        ("samples", "samples"),
    ]:
        p.add_argument(f"--{arg}", required=True, type=Path, help=f"directory of the runs' {what} files")
    p.add_argument("--out", required=True, type=Path, help="report directory (README.md, runs.csv, figures/)")
    args = p.parse_args(argv)
    cfg = study(args.params)
    missing = [n for n in cfg.runs if not all((d / f"{n}{ext}").exists() for d, ext in
               [(args.metrics, ".json"), (args.inside, ".safetensors")])]  # fmt: skip
    if missing:
        fail(f"report: no metrics or figure arrays for runs {missing}: run `dvc repro` (their evaluate stages) first")
    if missing := [n for n in cfg.baselines if not (args.metrics / f"{metrics_stem(n)}.json").exists()]:
        fail(f"report: no metrics for baselines {missing}: run `dvc repro` (their baseline stages) first")

    params = {
        "report": cfg.report.model_dump(mode="json"),
        "runs": ",".join(cfg.runs),
        "baselines": ",".join(cfg.baselines),
    }
    deps = {"metrics": args.metrics, "curves": args.curves, "inside": args.inside, "models": args.models,
            "samples": args.samples}  # fmt: skip
    description = f"the report of {len(cfg.runs)} runs: README.md (tables), runs.csv, figures/"
    tracked = tracker(cfg, "report", params, deps=deps, description=description)

    from lm.report import write_report

    with tracked:
        try:
            table = write_report(cfg, args.metrics, args.curves, args.inside, args.models, args.samples, args.out)
        except OSError as e:  # an OutputError: the previous report is unchanged
            fail(f"report: {e}")
        tracked.log_metrics({"runs": len(table)})
        made = {"report": args.out / "README.md", "runs": args.out / "runs.csv", "figures": args.out / "figures"}
        for path in made.values():  # not the rest of --out
            tracked.log_artifact(path, "figures" if path.is_dir() else None)
        outputs(tracked, **made)
    print(f"report: {len(table)} runs → {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
