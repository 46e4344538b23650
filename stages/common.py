"""What every stage does first: validate the whole params file, or exit before doing any work."""

from __future__ import annotations

import argparse
import os
import sys

from lm.config import ParamsError, StudyConfig, load_params


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file to validate and read (default: params.yaml)")
    return p


def study(path: str) -> StudyConfig:
    """Load and validate params; on any problem print one line per problem and exit 2."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def fail(message: str, code: int = 1) -> None:
    """Exit with a one-line error (the message names the problem and the fix)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
