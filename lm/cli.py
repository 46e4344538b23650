"""The `lm` command. Heavy libraries (torch, mlflow, datasets) are imported inside the commands,
so `lm --help` answers at once."""

from __future__ import annotations

import argparse
import sys


def _check_params(args: argparse.Namespace) -> int:
    from lm.config import ParamsError, load_params

    try:
        study = load_params(args.file)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.file}: ok ({len(study.corpora)} corpora, {len(study.tokenizers)} tokenizers, {len(study.runs)} runs)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lm",
        description="A reproducible study of language models, from a bigram table to a GPT. "
        "`dvc repro` runs the pipeline; this command inspects and uses what it produced.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser(
        "check-params",
        help="validate a params file and print one line per problem",
        description="Validate the whole params file (unknown keys, ranges, cross-references) without running anything. "
        "Exit status 0 when valid, 2 otherwise.",
    )
    c.add_argument("file", nargs="?", default="params.yaml", help="params file (default: params.yaml)")
    c.set_defaults(func=_check_params)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
