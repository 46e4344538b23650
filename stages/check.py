"""check: validate the params file before any other stage runs → params.ok.

    python -m stages.check --out params.ok

Every stage depends on params.ok, so `dvc repro` runs this first whenever params.yaml changes. Why a stage: DVC
removes a stage's outputs just before it runs it, so a stage that only found a bad params file when it ran (a run
naming a missing tokenizer, say) had already lost its trained model and its committed curve. This stops the
pipeline before any of that, with the same one line per problem as `lm check-params` (which `make repro` also
runs). The output's bytes never change, so passing the check re-runs nothing downstream.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import fail, parser, study


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="the file written when the params are valid")
    p.add_argument("--tokenizers", type=Path, default=Path("tokenizers"), help="built tokenizers (vocabulary sizes)")
    args = p.parse_args(argv)
    cfg = study(args.params)  # one line per problem, exit 2

    from lm.atomic import atomic_write_text
    from lm.memory import study_error, study_problems

    if problems := study_problems(cfg, args.tokenizers):
        fail(study_error(args.params, problems), 2)
    try:
        atomic_write_text(args.out, "ok\n")
    except OSError as e:
        fail(f"check: {e}")
    print(f"check: {args.params} is valid ({len(cfg.runs)} runs)")


if __name__ == "__main__":
    main()
