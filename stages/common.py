"""What every stage does first: validate the whole params file, or exit before doing any work with one line per
problem; stop when the `dvc` that runs it dies; exit without a last garbage collection; deterministic kernels; and
the stages' shared one-line errors and warnings."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from lm.config import ParamsError, StudyConfig, load_params
from stages.watchdog import stop_with_dvc


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file to validate and read (default: params.yaml)")
    return p


def pretrained_inputs(p: argparse.ArgumentParser) -> None:
    """The inputs of the stages that classify with a trained run (finetune, probe): its checkpoint, the tokenizers
    folder (the run's is the one params names) and the labelled corpus."""
    p.add_argument("--model", required=True, type=Path, help="the trained run's checkpoint, e.g. models/RUN")
    p.add_argument("--tokenizers", required=True, type=Path, help="the tokenizers folder (tokenize stage outputs)")
    p.add_argument("--data", required=True, type=Path, help="the labelled corpus folder, e.g. data/sms")


def study(path: str) -> StudyConfig:
    """Load and validate params (on any problem print one line per problem and exit 2), then arrange for this stage
    to stop when the `dvc` that runs it dies (:func:`stages.watchdog.stop_with_dvc`) and to exit fast."""
    try:
        cfg = load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        if (stage := os.environ.get("DVC_STAGE")) and stage != "check":
            print(removed_outputs_note(stage), file=sys.stderr)
        raise SystemExit(2) from None
    stop_with_dvc()
    # At exit Python runs its garbage collector over every object still alive, and with torch, MLflow and
    # SQLAlchemy loaded that takes most of a second, every stage, to free memory the OS takes back anyway. Frozen
    # objects are skipped; everything else still closes (the outputs are closed and renamed in place long before).
    atexit.register(gc.freeze)
    return cfg


def removed_outputs_note(stage: str) -> str:
    """What a stage run by DVC says when it stops before any work: DVC removed the stage's outputs before running
    it (it always does), and how to have them back."""
    return (
        f"note: DVC removed the outputs of {stage} before running it. Once the params are fixed, `dvc repro` makes "
        f"them again; to have the previous ones back now: `dvc checkout {stage}` (its cached outputs, e.g. models/) "
        "and `git checkout -- PATH` for each committed one `git status` lists as deleted (curves/, metrics/, ...)"
    )


def entry(section: Mapping[str, Any], name: str, what: str, params: str) -> Any:
    """`section[name]`, or exit 2 naming the entries `params` does define."""
    if name not in section:
        fail(f"unknown {what} {name!r}; {params} defines: {', '.join(sorted(section)) or '(none)'}", 2)
    return section[name]


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit with a one-line error (the message names the problem and the fix)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def deterministic() -> None:
    """Deterministic kernels for the stages that compute results (train, evaluate): an op without a
    deterministic implementation warns instead of failing. cuBLAS needs its workspace fixed before
    CUDA starts for its matmuls to be reproducible."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    # torch.use_deterministic_algorithms(True, warn_only=True), minus its `import torch._inductor.config`: that
    # import is a large share of a stage's start-up, paid by every train and evaluate stage, to set a flag only
    # torch.compile reads; lm.trainer sets it where it compiles.
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
