"""Can fp32 training give the same bits on another x86 CPU, and what does it cost? ``python -m bench.bitwise
[RUN ...] [--settings NAME ...] [--repeats N] [--threads N] [--params FILE] [--tokenizers DIR] [--out FILE]
[--compare FILE.json ...]``.

A CPU's floating-point results depend on the kernels its libraries pick: ATen's vectorised ops by the CPU's
capability (AVX-512, AVX2, ...), oneDNN's and MKL's matmuls by the instruction set and, for MKL, by a dynamic
schedule unless its conditional numerical reproducibility (CNR) mode is on. Each library has a setting that pins
its choice (:data:`SETTINGS`); this trains each RUN (in fp32, with its own seed, through the train and evaluate
stages' library calls, in temporary folders) once per setting and ``--repeats`` times, each in a fresh process
(the settings are read when torch loads), and prints per setting and run the val loss to the last bit, the
sha256 of the trained weights, whether the repeats agreed with each other and with the ``native`` setting, and
the time against ``native``.

The same command on two machines answers whether a setting makes them agree: ``--out FILE`` writes the table and
its JSON twin (machine record included), and ``--compare OTHER.json`` adds, per setting, whether each run's
weights are the same as in the other file. One machine alone shows what a setting changes and costs, and whether
it removes run-to-run differences; only two CPUs show whether it makes them agree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from lm.atomic import atomic_write_text, write_json

SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "mkl-cnr": {"MKL_CBWR": "AUTO"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "portable": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
}
"""Environment settings, each read when torch loads. ``native``: every library picks this CPU's fastest kernels.
``mkl-cnr``: MKL's CNR mode on its auto branch (same kernels, fixed cache sizes, deterministic reductions and
static scheduling: run-to-run identity on one machine). ``avx2``: all three held to AVX2 (MKL's AVX2 branch is
honoured on Intel CPUs only; on others MKL falls back to its auto branch). ``portable``: ATen's scalar kernels,
oneDNN held to SSE4.1 and MKL's COMPATIBLE branch (SSE2 without approximate reciprocals, the one branch MKL honours
on every vendor's x86 CPU): the candidate for the same bits on any x86 CPU."""

DEFAULT_RUNS = ["names-ngram-3", "names-mlp", "names-wavenet", "shakespeare-block-pre", "shakespeare-ablate-gpt"]
"""A counted model and four trained ones, from an MLP to a small GPT (trained in fp32 here whatever its dtype)."""


def child(name: str, run_json: str, tok_dir: str, threads: int) -> dict:
    """Train and score `name` in fp32 in this process (its settings already in the environment)."""
    import torch

    from bench.seeds import train_and_score
    from lm.config import RunConfig
    from lm.machine import describe

    run = RunConfig.model_validate_json(run_json)
    result = train_and_score(name, run_json, tok_dir, run.train.seed, "float32", threads)
    return result | {"capability": torch.backends.cpu.get_cpu_capability(), "machine": describe()}


def measure(setting: str, name: str, run_json: str, tok_dir: str, threads: int) -> dict:
    """One training of `name` under `setting`, in a fresh process (returns the child's result)."""
    env = {k: v for k, v in os.environ.items() if k not in {k for s in SETTINGS.values() for k in s}}
    code = "import json, sys; from bench.bitwise import child; print(json.dumps(child(*json.loads(sys.argv[1]))))"
    args = json.dumps([name, run_json, tok_dir, threads])
    out = subprocess.run(
        [sys.executable, "-c", code, args], env=env | SETTINGS[setting], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"bench.bitwise: {name} under {setting} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"setting": setting}


NOTE = (
    '"= native": "yes" when the weights and the val loss are the same to the last bit, "weights" when the trained '
    'weights are and the scoring differs in its last bits, "no" otherwise. Seconds: the fastest repeat.'
)


def _same(a: dict, b: dict | None) -> str:
    """Whether two results agree: "yes" (weights and val loss to the last bit), "weights" (the trained weights do,
    the scoring's last bits do not), "no", or "" when there is nothing to compare with."""
    if b is None:
        return ""
    if a["weights"] != b["weights"]:
        return "no"
    return "yes" if a["val_loss"] == b["val_loss"] else "weights"


def _key(r: dict) -> dict:
    return {"weights": r["weights"], "val_loss": repr(r["val"]["loss"])}


def table(results: list[dict], runs: list[str], settings: list[str], others: dict[str, dict], when: str) -> str:
    """The markdown: per setting and run, the val loss to the last bit, the weights' sha256, agreement, time."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        by.setdefault((r["setting"], r["run"]), []).append(r)
    machine = results[0]["machine"]
    head = f"### bench.bitwise: {when}, {machine['cpu']}, torch {machine['torch']}, {machine['threads']} threads"
    lines = [head, "", "| setting | run | val loss | weights sha256 | repeats agree | = native | seconds | x native |"]
    lines[-1] += "".join(f" = {o} |" for o in others)
    lines.append("|---|---|---:|---|---|---|---:|---:|" + "---|" * len(others))
    for s in settings:
        for name in runs:
            rs, base = by[s, name], by.get(("native", name), [])
            first, secs = _key(rs[0]), min(r["seconds"] for r in rs)
            repeats = {tuple(_key(r).values()) for r in rs}
            cells = [s, name, first["val_loss"], first["weights"][:12],
                     "yes" if len(repeats) == 1 else f"no ({len(repeats)} results)",
                     _same(first, _key(base[0]) if base else None), f"{secs:.1f}",
                     f"{secs / min(r['seconds'] for r in base):.2f}" if base else ""]  # fmt: skip
            cells += [_same(first, other.get("digests", {}).get(s, {}).get(name)) for other in others.values()]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


def as_json(results: list[dict]) -> dict:
    """What another machine's ``--compare`` reads: this machine and, per setting and run, the weights' sha256 and
    the val loss to the last bit."""
    digests: dict[str, dict[str, dict]] = {}
    for r in results:
        digests.setdefault(r["setting"], {})[r["run"]] = _key(r)
    return {"machine": results[0]["machine"], "settings": SETTINGS, "digests": digests, "results": results}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", metavar="RUN", help=f"runs to train (default: {' '.join(DEFAULT_RUNS)})")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="settings to try")
    ap.add_argument("--repeats", type=int, default=2, help="trainings per setting and run, each a fresh process")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fixed: the count changes the bits)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    ap.add_argument("--tokenizers", type=Path, default=Path("tokenizers"), help="built tokenizers (dvc repro)")
    ap.add_argument("--out", type=Path, help="also write the table to this .md file and its numbers beside it (.json)")
    ap.add_argument("--compare", type=Path, nargs="*", default=[], help="another machine's --out JSON to compare")
    args = ap.parse_args(argv)

    from bench.seeds import run_problems
    from lm.config import ParamsError, load_params

    try:
        study = load_params(args.params)
    except ParamsError as e:
        ap.error(str(e))
    runs = args.runs or [n for n in DEFAULT_RUNS if n in study.runs]
    problems = run_problems(study, [n for n in runs if n in study.runs and study.runs[n].model.fitting == "gradient"],
                            args.params, args.tokenizers, "")  # fmt: skip
    problems += [f"{n!r} is not a run of {args.params}" for n in runs if n not in study.runs]
    problems += [f"{p}: not found" for p in args.compare if not p.is_file()]
    if args.repeats < 1 or args.threads < 1:
        problems.append("--repeats and --threads must be at least 1")
    if not runs or problems:
        ap.error("; ".join(problems) or "no run to train")
    loaded = [(p, json.loads(p.read_text())) for p in args.compare]
    others = {other["machine"]["cpu"] or p.stem: other for p, other in loaded}
    results = []
    for s in args.settings:
        for name in runs:
            run = study.runs[name]
            for _ in range(args.repeats):
                r = measure(s, name, run.model_dump_json(), str(args.tokenizers / run.tokenizer), args.threads)
                loss, digest = repr(r["val"]["loss"]), r["weights"][:12]
                print(f"{s:9s} {name:24s} {loss:22s} {digest} {r['seconds']:6.1f}s", flush=True)
                results.append(r)
    text = table(results, runs, args.settings, others, f"{dt.datetime.now():%Y-%m-%d %H:%M}")
    print(text)
    if args.out:
        atomic_write_text(args.out.with_suffix(".md"), text)
        write_json(args.out.with_suffix(".json"), as_json(results))


if __name__ == "__main__":
    main()
