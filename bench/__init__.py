"""Benchmarks that are run by hand (``python -m bench.<name>``), not by the test suite or the pipeline.

- ``bench.train_speed``: training throughput and MFU, the race against nanoGPT's CPU example and the time to its
  quality (``--race``), the levers, the ablation's tokens/s; ``bench.mfu``: the matmul peaks and FLOPs they are
  measured against.
- ``bench.generate``: sampling tokens/s with and without the KV cache (``--write`` appends to reports/bench.md).
- ``bench.ngram``: Kneser–Ney fitting and scoring speed.
- ``bench.gpu_check`` (run by ``bench/gpu.sh`` on a lent GPU): the sources preset's Shakespeare GPT through the
  study's code beside nanoGPT's loop (``bench.nanogpt``), and the study's time to the reference's loss.
- ``bench.makemore_bn`` / ``bench.makemore_transformer``: a source anchor's recipe written plainly and run
  here over seeds, so a published number can be read against its own code's spread (reports/sources/).
- ``bench.threads``: training steps when the machine is not idle (a busy process beside, two trainings at once),
  for each way OpenMP's threads can wait (lm/threads.py).
- ``bench.seeds``: runs of the params file trained again over several seeds, so a difference between two rows of
  the report can be read against a run's own seed-to-seed spread (reports/seeds/).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lm  # noqa: F401  (before any benchmark imports torch: how its OpenMP threads wait, as in the stages)


def add_names_argument(ap: argparse.ArgumentParser) -> None:
    """``--names``: names.txt, by default from the corpora mirror (``$LM_DATA_MIRROR/names.txt``)."""
    mirror = os.environ.get("LM_DATA_MIRROR")
    default = Path(mirror) / "names.txt" if mirror else None
    ap.add_argument("--names", type=Path, default=default, help="names.txt (default: $LM_DATA_MIRROR/names.txt)")


def names_text(ap: argparse.ArgumentParser, path: Path | None) -> str:
    """The text of names.txt, or the parser's usage error naming the fix."""
    if path is None or not path.is_file():
        ap.error(
            f"names.txt not found ({path}): pass --names PATH (the file at params' corpora.names.url) "
            "or set LM_DATA_MIRROR to the folder that holds it"
        )
    return path.read_text(encoding="utf-8")


BENCH_MD = Path("reports") / "bench.md"
"""Where ``--write`` appends a benchmark's tables (not a pipeline output: DVC does not track it)."""


def append_to_bench(text: str, path: Path = BENCH_MD) -> Path:
    """Append a benchmark's markdown to reports/bench.md (created with its title if missing); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "" if path.exists() else "# Benchmarks\n\nAppended by the benchmarks' `--write` (bench/).\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(header + "\n" + text.rstrip("\n") + "\n")
    return path
