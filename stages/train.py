"""train@<run>: build the run's model, fit it on the tokenized corpus, write the checkpoint and curve.

Data-parallel: `torchrun --nproc_per_node=N -m stages.train RUN ...` (same arguments); rank 0 alone
tracks and writes, every rank trains on its share of each batch. `--log-only` logs a finished run to
MLflow again from its outputs (after tracking failed mid-run), training nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from stages.common import deterministic, entry, fail, parser, study
from stages.mlflow_run import describe, outputs, tracker


def parse_args(argv: list[str] | None):
    p = parser("Train one run of params.yaml `runs` and write its checkpoint, train.json and curve CSV.")
    p.add_argument("run", help="run name (a key of `runs`)")
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (tokenize stage output)")
    p.add_argument("--out", required=True, type=Path, help="output directory for the checkpoint")
    p.add_argument("--curve", required=True, type=Path, help="training curve CSV to write (for dvc plots)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-only", action="store_true", help="log the written outputs to MLflow again; train nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = study(args.params)
    entry(cfg.runs, args.run, "run", args.params)
    if args.log_only and not (args.out / "train.json").is_file():
        fail(f"train@{args.run}: --log-only needs the outputs of a finished run; {args.out}/train.json is missing")
    # torchrun's contract: RANK / WORLD_SIZE / LOCAL_RANK in the environment.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # Opened before the heavy imports and any training: an unreachable tracking server fails here.
    tracked = _open_run(cfg, args, world) if rank == 0 else None

    from lm.tracking import NullTracker
    from lm.train_run import log_outputs

    log_weights = cfg.runs[args.run].model.family in cfg.tracking.log_checkpoints
    if args.log_only:
        with tracked or NullTracker() as t:
            log_outputs(t, args.out, args.curve, args.tokenizer, log_weights=log_weights, history=True)
            outputs(t, model=args.out, curve=args.curve)
        print(f"train@{args.run}: logged again from {args.out} and {args.curve}")
        return
    summary = _train(cfg, args, tracked or NullTracker(), rank, world, log_weights)
    if rank == 0:
        print(
            f"train@{args.run}: {summary['params']:,} params, {summary['steps']} steps, "
            f"val {summary['val_loss']:.4f}, {summary['train_seconds']:.1f}s, {summary['tokens_per_s']:.0f} tok/s"
            + (f", {summary['dtype']}" if "dtype" in summary else "")
        )


def _open_run(cfg, args, world: int):
    """This stage's MLflow run (rank 0's), tagged with the run, its corpus, tokenizer, family and world size."""
    run = cfg.runs[args.run]
    corpus = cfg.tokenizers[run.tokenizer].corpus
    tags = {"lm.run": args.run, "corpus": corpus, "tokenizer": run.tokenizer, "family": run.model.family}
    tags |= {"world_size": str(world)} | ({"lm.relogged": "true"} if args.log_only else {})
    params = {"corpus": corpus, **run.model_dump(mode="json")}
    return tracker(cfg, f"train@{args.run}", params, deps={"tokenizer": args.tokenizer}, tags=tags, relog=True,
                   description=describe(cfg, args.run))  # fmt: skip


def _train(cfg, args, tracked, rank: int, world: int, log_weights: bool) -> dict:
    """Train the run (every rank; rank 0 writes and tracks) and return its summary; a failure exits with one line
    (130 when interrupted: the state is saved)."""
    from lm import distributed
    from lm.atomic import Busy
    from lm.checkpoint import CheckpointError
    from lm.provenance import code_digests
    from lm.train_run import NotWritten, train_run
    from lm.trainer import DivergedError, Interrupted

    run, stage = cfg.runs[args.run], f"train@{args.run}"
    deterministic()
    distributed.init(rank, world, int(os.environ.get("LOCAL_RANK", "0")), run.train.device)
    try:
        with tracked:
            try:
                summary = train_run(
                    args.run, run, args.tokenizer, args.out, args.curve, logger=tracked, log_weights=log_weights,
                    progress=not args.no_progress, code=code_digests(__spec__.name if __spec__ else "stages.train"),
                )  # fmt: skip
            except Interrupted as e:
                fail(f"{stage}: {e}", 130)
            except (DivergedError, CheckpointError, Busy, NotWritten, ValueError, RuntimeError, OSError) as e:
                fail(f"{stage}: {e}")
            if rank == 0:
                outputs(tracked, model=args.out, curve=args.curve)
    finally:
        distributed.shutdown()
    return summary


if __name__ == "__main__":
    main()
