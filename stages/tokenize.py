"""Train one tokenizer on its corpus's train split and encode every split into tokenizers/NAME.

    python -m stages.tokenize NAME --data data/CORPUS --out tokenizers/NAME [--params params.yaml]

Writes tokenizer.json, <split>.bin (raw token ids) and stats.json; see lm/tokenizer.py.
"""

from __future__ import annotations

from pathlib import Path

from lm.atomic import OutputError
from lm.tokenizer import TokenizerError, tokenize_corpus
from lm.tracking import numeric_leaves
from stages.common import entry, fail, parser, study
from stages.mlflow_run import outputs, tracker


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("tokenizer", help="tokenizer name (a key of `tokenizers` in params)")
    p.add_argument(
        "--data", required=True, type=Path, help="prepared corpus folder (fetch stage output), e.g. data/names"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder, e.g. tokenizers/names-char")
    args = p.parse_args(argv)
    params = study(args.params)
    name = args.tokenizer
    entry(params.tokenizers, name, "tokenizer", args.params)
    cfg = params.tokenizers[name]
    fmt = params.corpora[cfg.corpus].format

    tracked = tracker(
        params,
        f"tokenize@{name}",
        {"tokenizer": name, **cfg.model_dump(mode="json")},
        deps={"data": args.data},
        tags={"corpus": cfg.corpus, "tokenizer": name},
        description=f"{cfg.kind} tokenizer{f' of {cfg.vocab_size} tokens' if cfg.vocab_size else ''} on {cfg.corpus}",
    )

    from lm.data import DataError, load_splits  # lazily: datasets is slow to import

    with tracked:
        try:
            stats = tokenize_corpus(cfg, load_splits(args.data), fmt, args.out, name=name)
        except (TokenizerError, DataError, OutputError) as e:  # the message names the problem and the fix
            fail(f"{name}: {e}")
        tracked.log_metrics({"vocab_size": stats["vocab_size"], **numeric_leaves(stats["splits"], "splits")})
        tracked.log_artifact(args.out / "tokenizer.json")
        tracked.log_artifact(args.out / "stats.json")
        outputs(tracked, tokenizer=args.out)
    vocab = f"vocab {stats['vocab_size']}"
    if cfg.vocab_size is not None and stats["vocab_size"] != cfg.vocab_size:
        vocab += f" (asked {cfg.vocab_size}: the train split has too few merges)"
    splits = " / ".join(
        f"{k} {v['tokens']:,} ({v['chars_per_token']:.2f} chars/tok)" for k, v in stats["splits"].items()
    )
    oov = sum(v["oov"] for v in stats["splits"].values())
    print(
        f"{name}: {cfg.kind} on {cfg.corpus}, {vocab}, {stats['dtype']} → {splits} tokens"
        f"{f', {oov:,} OOV chars → [UNK]' if oov else ''} → {args.out}"
    )


if __name__ == "__main__":
    main()
