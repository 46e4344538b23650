"""gguf-report: the llama.cpp checks and quantization table → reports/gguf/; the measured speeds → gguf/speed.md."""

from __future__ import annotations

from pathlib import Path

from stages.common import fail, parser, study
from stages.mlflow_run import outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--metrics", required=True, type=Path, help="folder of the gguf stages' metrics JSON")
    p.add_argument("--speed", required=True, type=Path, help="folder of the gguf stages' speed JSON")
    p.add_argument("--out", required=True, type=Path, help="report folder (README.md, figures/)")
    p.add_argument("--speed-out", required=True, type=Path, help="the speed page, e.g. gguf/speed.md")
    args = p.parse_args(argv)
    cfg = study(args.params)
    if missing := [n for n in cfg.gguf if not (args.metrics / f"{n}.json").exists()]:
        fail(f"gguf-report: no outputs of gguf@{', gguf@'.join(missing)}: run `make gguf` (their stages) first")
    deps = {"metrics": args.metrics, "speed": args.speed}
    tracked = tracker(cfg, "gguf-report", {"gguf": ",".join(cfg.gguf)}, deps=deps, description="the llama.cpp report")

    from lm.report.gguf import write_gguf_report

    with tracked:
        try:
            rows = write_gguf_report(cfg, args.metrics, args.speed, args.out, args.speed_out)
        except OSError as e:
            fail(f"gguf-report: {e}")
        tracked.log_artifact(args.out / "README.md")
        tracked.log_artifact(args.speed_out)
        outputs(tracked, report=args.out, speed=args.speed_out)
    print(f"gguf-report: {len(rows)} runs → {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
