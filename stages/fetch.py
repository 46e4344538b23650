"""Fetch, clean and split one corpus into data/CORPUS (a HF dataset + stats.json).

    python -m stages.fetch CORPUS --out data/CORPUS [--params params.yaml]

The raw file comes from the folder named by env LM_DATA_MIRROR when it holds the corpus's file
(empty or unset: download from the pinned URL); either way its sha256 must match params.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lm.atomic import OutputError
from lm.data import DataError, prepare_corpus
from lm.tracking import numeric_leaves
from stages.common import entry, fail, parser, study
from stages.mlflow_run import outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("corpus", help="corpus name (a key of `corpora` in params)")
    p.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/names")
    args = p.parse_args(argv)
    params = study(args.params)
    entry(params.corpora, args.corpus, "corpus", args.params)
    cfg = params.corpora[args.corpus]
    mirror = Path(m) if (m := os.environ.get("LM_DATA_MIRROR", "").strip()) else None
    origin = "mirror" if mirror and (mirror / cfg.filename).is_file() else "download"
    tracked = tracker(
        params,
        f"fetch@{args.corpus}",
        {"corpus": args.corpus, "seed": params.seed, **cfg.model_dump(mode="json")},
        tags={"corpus": args.corpus, "origin": origin},
        description=f"corpus {args.corpus}: {cfg.filename} ({cfg.format}), split "
        + " / ".join(f"{k} {v:g}" for k, v in cfg.split.model_dump().items() if v),
    )
    with tracked:
        try:
            stats = prepare_corpus(args.corpus, cfg, params.seed, args.out, mirror, progress=sys.stderr.isatty())
        except (DataError, OutputError) as e:  # the message names the file and the fix
            fail(f"{args.corpus}: {e}")
        tracked.log_metrics(
            {**numeric_leaves(stats["splits"], "splits"), **numeric_leaves(stats.get("cleaning", {}), "cleaning")}
        )
        tracked.log_artifact(args.out / "stats.json")
        outputs(tracked, data=args.out)
    sizes = " / ".join(
        f"{k} {v['characters'] if cfg.format == 'text' else v['examples']:,}" for k, v in stats["splits"].items()
    )
    unit = "chars" if cfg.format == "text" else "examples"
    if cfg.format == "labelled":
        kinds = ", ".join(f"{n:,} {x}" for x, n in stats["examples"]["by_label"].items())
        detail = f"of {stats['examples']['all']:,} lines ({kinds}){', balanced' if cfg.balance else ''}, stratified"
    else:
        detail = f"{stats['splits']['train']['distinct_characters']} distinct chars in train"
    print(
        f"{args.corpus}: {cfg.filename} ({origin}, sha256 {cfg.sha256[:12]}…) → {sizes} {unit}, {detail} → {args.out}"
    )


if __name__ == "__main__":
    main()
