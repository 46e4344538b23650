"""check: validate the params file before any other stage runs → params.ok; and write each stage module's code
manifest → code/<module>.txt.

    python -m stages.check --out params.ok --code code/stages.train.txt ...

Every stage depends on params.ok, so `dvc repro` runs this first whenever params.yaml changes. Why a stage: DVC
removes a stage's outputs just before it runs it, so a stage that only found a bad params file when it ran (a run
naming a missing tokenizer, say) had already lost its trained model and its committed curve. This stops the
pipeline before any of that, with the same one line per problem as `lm check-params` (which `make repro` also
runs). The output's bytes never change, so passing the check re-runs nothing downstream.

The code manifests: a stage depends on the code it runs through one file, the sha256 of every project file its
module imports (lm.provenance.code_manifest; `sha256sum -c code/stages.train.txt` checks them), rather than through
those files themselves. This stage depends on all of lm/ and stages/ and runs after any edit there, and a manifest
changes only when a file it lists does, so an edit re-runs exactly the stages that import the file. Why: DVC
rewrites all of dvc.lock after every stage, and with every code file listed in every stage that took longer
than most stages' own work.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import fail, parser, study


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="the file written when the params are valid")
    p.add_argument("--code", nargs="*", type=Path, default=[], help="code manifests to write: code/<module>.txt")
    p.add_argument("--tokenizers", type=Path, default=Path("tokenizers"), help="built tokenizers (vocabulary sizes)")
    args = p.parse_args(argv)
    cfg = study(args.params)  # one line per problem, exit 2

    from lm.atomic import atomic_write_text
    from lm.memory import study_error, study_problems
    from lm.provenance import code_manifest, manifest_module, module_file

    if missing := [str(f) for f in args.code if module_file(manifest_module(f)) is None]:
        fail(f"check: no project module for the code manifest(s) {', '.join(missing)}: name them code/<module>.txt")
    if problems := study_problems(cfg, args.tokenizers):
        fail(study_error(args.params, problems), 2)
    try:
        for file in args.code:
            atomic_write_text(file, code_manifest(manifest_module(file)))
        atomic_write_text(args.out, "ok\n")
    except OSError as e:
        fail(f"check: {e}")
    print(f"check: {args.params} is valid ({len(cfg.runs)} runs); code manifests of {len(args.code)} stage modules")


if __name__ == "__main__":
    main()
