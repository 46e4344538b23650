"""finetune-report: the fine-tuning table and figures → reports/finetune/README.md, reports/finetune/figures/."""

from __future__ import annotations

from pathlib import Path

from lm.classification import metrics_stem
from stages.common import fail, parser, study
from stages.mlflow_run import outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--finetune", required=True, type=Path, help="folder of the finetune stages' metrics JSON")
    p.add_argument("--probes", required=True, type=Path, help="folder of the probe stages' JSON")
    p.add_argument("--metrics", required=True, type=Path, help="folder of the baselines' metrics JSON")
    p.add_argument("--out", required=True, type=Path, help="report folder (README.md, figures/)")
    args = p.parse_args(argv)
    cfg = study(args.params)
    missing = [f"finetune {n}" for n in cfg.finetune if not (args.finetune / f"{n}.json").exists()]
    missing += [f"probe {n}" for n in cfg.probes if not (args.probes / f"{n}.json").exists()]
    missing += [f"baseline {n}" for n in cfg.baselines if not (args.metrics / f"{metrics_stem(n)}.json").exists()]
    if missing:
        fail(f"finetune-report: no outputs of {', '.join(missing)}: run `make finetune` (their stages) first")
    params = {k: ",".join(getattr(cfg, k)) for k in ("finetune", "probes", "baselines")}
    deps = {"finetune": args.finetune, "probes": args.probes, "metrics": args.metrics}
    tracked = tracker(cfg, "finetune-report", params, deps=deps, description="the fine-tuning report")

    from lm.report.finetune import write_finetune_report

    with tracked:
        try:
            rows = write_finetune_report(cfg, args.finetune, args.probes, args.metrics, args.out)
        except OSError as e:
            fail(f"finetune-report: {e}")
        tracked.log_artifact(args.out / "README.md")
        outputs(tracked, report=args.out)
    print(f"finetune-report: {len(rows)} fine-tunes, {len(cfg.probes)} probes → {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
