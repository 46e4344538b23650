"""Did the study reproduce here? Every committed number (git's HEAD) against the one this checkout holds (the
working tree's outputs), judged with a tolerance, and the study's conclusions recomputed from both.

Two cases, told apart by the machine record the report stage writes (reports/machine.json, lm/machine.py):

- **Same machine class** (CPU model, kernel flags, threads, library versions): every tracked output must be
  bit-identical, as `tests/test_pipeline.py` shows two runs on one machine are.
- **Another CPU**: floating-point sums run in another order, so the last bits move and training carries them
  forward. Each run's numbers must then agree within its tolerance (:func:`tolerance`), derived from what was
  measured between machines; samples and figures are judged by the run they come from, not by their bytes.

Either way the conclusions a reader would quote (the best run per corpus, the n-gram against the best neural run,
the sign of each step up the ladder and of each ablation change, the anchors met or missed) must come out the same.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lm.classification import metrics_stem
from lm.config import StudyConfig
from lm.machine import differences, same_class

TRACKED = ("dvc.lock", "metrics", "curves", "samples", "reports")
"""The pipeline outputs git tracks (dvc.yaml's outs that are not cached, and dvc.lock)."""

MACHINE = Path("reports/machine.json")
DTYPES = Path("reports/dtypes.json")
SEEDS = Path("reports/seeds")

COUNTED = 1e-7
"""Counted models (n-grams, the count bigram): sums of counts in float64. Measured between machines: 0 (AMD EPYC
Zen 5 and Intel Xeon, 2026-12-05), 3.6e-9 (an AVX2-only AMD EPYC Zen 3)."""

FP32 = 5e-5
"""fp32 training, val/test/train loss, nats. Measured between an AMD EPYC Zen 5 and an Intel Xeon (2026-12-05):
at most 2.8e-6 (names-wavenet, 8,000 steps), most under 1e-7; a tenfold margin over the largest."""

FP32_CURVE = 5e-4
"""fp32 training, every point of the curve (val estimates on the fixed subset, train loss): measured at most
4.6e-5 (names-wavenet, same machines); a tenfold margin."""

BF16_SEED_SD = 1.0
"""bf16 autocast: the tolerance is this many of the run's seed sd (bench.seeds, reports/seeds/). bf16 rounds away
16 bits of every product, so a kernel change is a new draw of the rounding: measured between the two machines
above, the bf16 runs' val losses moved by up to 0.71 of their seed sd (shakespeare-ablate-swiglu, 0.0066 of
0.0093), their curves by up to 1.3 sd (CURVE_SDS)."""

BF16_CURVE_SDS = 2.0
"""bf16 autocast, each curve point: this many seed sd."""

DEFAULT_SD = 0.015
"""A bf16 run without a seed table: the largest seed sd measured among the bf16 runs (shakespeare-ablate-rmsnorm's
0.0164, rounded)."""

LOSS_KEYS = ("val/loss", "test/loss", "train/loss", "all/loss")
SCALED_KEYS = {"val/bpc": "val/loss", "test/bpc": "test/loss", "val/ppl": "val/loss"}
EXACT_KEYS = ("params", "val/tokens", "val/characters", "test/tokens", "train/steps", "train/tokens", "vocab_size")


@dataclass(frozen=True)
class Check:
    """One compared number: where it is, both values, the difference allowed and whether it held."""

    run: str
    number: str
    committed: float | str | None
    here: float | str | None
    tolerance: float
    ok: bool
    note: str = ""

    def difference(self) -> float | None:
        if isinstance(self.committed, (int, float)) and isinstance(self.here, (int, float)):
            return self.here - self.committed
        return None


@dataclass(frozen=True)
class Tolerance:
    """A run's allowed differences: final losses, curve points, and why."""

    loss: float
    curve: float
    why: str


def git_show(root: Path, path: Path | str, rev: str = "HEAD") -> str | None:
    """The text of `path` at `rev` (None where git has no such file)."""
    r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def changed_files(root: Path) -> list[str]:
    """Tracked pipeline outputs that differ from HEAD (or are new or gone), as `git status` lists them."""
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *TRACKED], cwd=root,
                       capture_output=True, text=True, check=True)  # fmt: skip
    return [line[3:] for line in r.stdout.splitlines()]


def seed_sds(text_by_file: dict[str, str]) -> dict[str, float]:
    """Each run's seed sd of its val loss from bench.seeds' tables (the first table of each file; a bpc table is
    marked so, and converted by the caller): {run: sd} with a 'bpc:' prefix on runs measured in bpc."""
    out: dict[str, float] = {}
    for text in text_by_file.values():
        bpc = "val bpc" in text.split("\n\n")[1] if "\n\n" in text else False
        header: list[str] | None = None
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| run |") and "sd" in cells:
                if header is not None:
                    break  # the first table only: whole-split val
                header = cells
            elif header and line.startswith("| ") and len(cells) == len(header) and not line.startswith("|---"):
                with_unit = f"bpc:{cells[0]}" if bpc else cells[0]
                out.setdefault(with_unit, float(cells[header.index("sd")]))
    return out


def tolerance(run: str, counted: bool, dtype_then: str, dtype_now: str, sd: float | None, dtype_gap: float | None):
    """The differences `run` may show on another CPU (module constants: what was measured, and why)."""
    if counted:
        return Tolerance(COUNTED, COUNTED, "counted: float64 sums")
    if dtype_then == dtype_now == "float32":
        return Tolerance(FP32, FP32_CURVE, "fp32: kernels' last bits")
    sd_known = sd is not None
    sd = sd if sd_known else DEFAULT_SD
    why = f"bf16: {BF16_SEED_SD:g} seed sd ({sd:.4f}{'' if sd_known else ', no seed table: the largest measured'})"
    loss, curve = BF16_SEED_SD * sd, BF16_CURVE_SDS * sd
    if dtype_then != dtype_now:
        gap = dtype_gap if dtype_gap is not None else 3 * sd
        why = f"{dtype_then} then, {dtype_now} here: the measured gap {gap:.4f} (reports/dtypes.md) + {why}"
        loss, curve = loss + abs(gap), curve + 3 * abs(gap)
    return Tolerance(loss, curve, why)


@dataclass
class Sources:
    """Where verify reads: the committed text of a path (`then`) and this checkout's (`now`), both None when absent."""

    then: Callable[[str], str | None]
    now: Callable[[str], str | None]

    @classmethod
    def of(cls, root: Path, rev: str = "HEAD") -> Sources:
        def now(path: str) -> str | None:
            p = root / path
            return p.read_text(encoding="utf-8") if p.is_file() else None

        return cls(lambda path: git_show(root, path, rev), now)

    def json(self, path: str) -> tuple[dict | None, dict | None]:
        a, b = self.then(path), self.now(path)
        return (json.loads(a) if a else None), (json.loads(b) if b else None)


def _curve(text: str | None) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text))) if text else []


def compare_run(name: str, then: dict, now: dict, curves: tuple[str | None, str | None], tol: Tolerance) -> list[Check]:
    """A run's metrics and curve, committed against here: losses (and bpc, ppl scaled to them) within `tol`,
    counts exactly, every curve point within `tol.curve` (steps, tokens and lr exactly)."""
    checks = []
    for key in (*LOSS_KEYS, *SCALED_KEYS):
        if key not in then and key not in now:
            continue
        a, b = then.get(key), now.get(key)
        base = SCALED_KEYS.get(key)
        allowed = tol.loss * (then[key] / then[base] if base and a is not None and then.get(base) else 1.0)
        if key.endswith("ppl") and a is not None:
            allowed = a * math.expm1(tol.loss)  # ppl = exp(loss)
        ok = a is not None and b is not None and abs(b - a) <= allowed
        checks.append(Check(name, key, a, b, allowed, ok, tol.why))
    for key in EXACT_KEYS:
        if key in then or key in now:
            checks.append(Check(name, key, then.get(key), now.get(key), 0.0, then.get(key) == now.get(key)))
    a_rows, b_rows = (_curve(c) for c in curves)
    if a_rows or b_rows:
        grid = [[(r["step"], r["tokens"], r["lr"]) for r in rows] for rows in (a_rows, b_rows)]
        same_grid = grid[0] == grid[1]
        worst = max((abs(float(y[k]) - float(x[k])) for x, y in zip(a_rows, b_rows) for k in ("train_loss", "val_loss")
                     if x[k] and y[k]), default=0.0)  # fmt: skip
        ok = same_grid and worst <= tol.curve
        note = tol.why if same_grid else "the curve's steps, tokens or lr differ"
        checks.append(Check(name, "curve (largest point difference)", 0.0, worst, tol.curve, ok, note))
    return checks


FINETUNE_METRICS = "finetune/metrics"
"""Where the finetune stages' metrics are (dvc.yaml names it; `make finetune` writes them)."""


def compare_classifier(name: str, then: dict, now: dict, spread: float = 0.0) -> list[Check]:
    """A classifier's accuracy and F1 per split, committed against here, within one example of the split (a
    solver's last bits can move one message across the decision boundary on another CPU), or within twice
    `spread` (a fine-tune's sd of test accuracy over its seeds: 120 steps amplify last bits into a few messages)."""
    checks = []
    for split, a in then["splits"].items():
        b = now["splits"].get(split, {})
        allowed = max(1 / a["examples"], 2 * spread)
        why = "one example" if allowed == 1 / a["examples"] else "2 seed sd"
        for key in ("accuracy", "f1"):
            if key in a:
                ok = key in b and abs(b[key] - a[key]) <= allowed + 1e-12
                checks.append(Check(name, f"{split}/{key}", a[key], b.get(key), allowed, ok, why))
    return checks


def _neural(study: StudyConfig, name: str) -> bool:
    return study.runs[name].model.family != "ngram"


def conclusions(
    study: StudyConfig, metrics: dict[str, dict], tols: dict[str, Tolerance], noise: bool = True
) -> dict[str, str]:
    """The claims a reader would quote, as text, from one set of metrics: per corpus the best run (val bpc) and
    whether an n-gram or a neural run is best; the sign of each step up the ladder (consecutive neural runs of a
    corpus in params order, the ablation apart) and of each ablation change, where the step is larger than the
    two runs' tolerances together (else 'within noise'); each anchor's verdict. With `noise` False (how the
    checkout's numbers are judged), the best run alone and each step's sign."""
    from lm.report.tables import anchor_verdict

    out: dict[str, str] = {}

    def _bpc_tol(*names: str) -> float:
        """The runs' tolerances together, in bpc."""
        return sum(tols[n].loss * metrics[n]["val/bpc"] / metrics[n]["val/loss"] for n in names)

    corpus = {n: study.tokenizers[r.tokenizer].corpus for n, r in study.runs.items()}
    ablation = list(study.report.ablation)
    for c in dict.fromkeys(corpus.values()):
        runs = [n for n in study.runs if corpus[n] == c and n in metrics]
        if not runs:
            continue
        bpc = {n: metrics[n]["val/bpc"] for n in runs}
        best = min(runs, key=bpc.get)
        # Runs within noise of the best share the claim ("a or b"): either may come out best elsewhere.
        tied = [n for n in runs if not noise and n == best or noise and bpc[n] - bpc[best] <= _bpc_tol(n, best)]
        out[f"{c}: best run (val bpc)"] = " or ".join(tied)
        out[f"{c}: best family kind"] = " or ".join(
            dict.fromkeys("neural" if _neural(study, n) else "n-gram" for n in tied)
        )
        ladder = [n for n in runs if _neural(study, n) and n not in ablation]
        for steps in (ladder, [n for n in ablation if n in runs]):
            for a, b in zip(steps, steps[1:]):
                # bpc: runs of one corpus may differ in tokenizer. The noise is the two runs' tolerances in bpc.
                delta = metrics[b]["val/bpc"] - metrics[a]["val/bpc"]
                allowed = _bpc_tol(a, b)
                out[f"{c}: {a} → {b} (val bpc)"] = (
                    "within noise" if noise and abs(delta) <= allowed else ("better" if delta < 0 else "worse")
                )
    for anchor in study.report.anchors:
        ref, m = anchor.reference, metrics.get(anchor.run)
        if m is not None:
            verdict = anchor_verdict(m[ref.metric], ref.value, ref.tolerance, int(m["train/steps"]), ref.steps)
            out[f"anchor {anchor.published} ({anchor.run})"] = verdict.strip("*")
    return out


@dataclass
class Verdict:
    """What `lm verify` found: the case it judged, every check, the conclusions both ways, what else is wrong."""

    case: str
    machine: list[str]
    checks: list[Check]
    claims: list[tuple[str, str, str]]
    changed: list[str]
    problems: list[str]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def flipped(self) -> list[tuple[str, str, str]]:
        """Claims that came out otherwise here. A step the commit found within noise is no claim; a step it found
        beyond noise must keep its sign here (judged by sign alone here); a best run must be one of those the
        commit found within noise of the best."""
        return [c for c in self.claims if c[1] != "within noise" and c[2] not in c[1].split(" or ")]

    @property
    def ok(self) -> bool:
        return not (self.failed or self.flipped or self.problems or (self.case.startswith("same") and self.changed))


def _sds(root: Path, src: Sources, metrics: dict[str, dict]) -> dict[str, float]:
    """Each run's seed sd of val loss, from the committed bench.seeds tables (bpc ones converted with the run's own
    loss/bpc ratio)."""
    texts = {p.name: src.then(str(SEEDS / p.name)) or "" for p in sorted((root / SEEDS).glob("*.md"))}
    out = {}
    for key, sd in seed_sds(texts).items():
        run = key.removeprefix("bpc:")
        if key.startswith("bpc:"):
            m = metrics.get(run)
            if not m:
                continue
            sd *= m["val/loss"] / m["val/bpc"]
        out.setdefault(run, sd)
    return out


def verify(study: StudyConfig, root: Path, rev: str = "HEAD") -> Verdict:
    """Judge this checkout's pipeline outputs against those committed at `rev` (module docstring)."""
    src = Sources.of(root, rev)
    machine_then, machine_now = src.json(str(MACHINE))
    if machine_then is None or machine_now is None:
        case, machine = "no machine record: judged within tolerance", []
    elif same_class(machine_then, machine_now):
        case, machine = "same machine class: bit-identical expected", []
    else:
        case, machine = "another CPU: within tolerance", differences(machine_then, machine_now)
    then_all, now_all, problems = {}, {}, []
    for name in study.runs:
        a, b = src.json(f"metrics/{name}.json")
        if a is None or b is None:
            problems.append(f"{name}: metrics/{name}.json is {'not committed' if a is None else 'missing here'}")
            continue
        then_all[name], now_all[name] = a, b
    listed = subprocess.run(["git", "ls-tree", "--name-only", rev, "metrics/"], cwd=root, capture_output=True,
                            text=True).stdout.split()  # fmt: skip
    known = set(study.runs) | {metrics_stem(n) for n in study.baselines}
    problems += [f"{Path(p).stem}: committed, but not a run or baseline of the params" for p in listed
                 if p.endswith(".json") and Path(p).stem not in known]  # fmt: skip
    dtypes = json.loads(src.then(str(DTYPES)) or "{}")
    sds = _sds(root, src, then_all)
    tols, checks = {}, []
    for name, a in then_all.items():
        b = now_all[name]
        counted = study.runs[name].model.fitting == "counting"
        gap = dtypes.get(name)
        gap = gap["float32"]["val/loss"] - gap["bfloat16"]["val/loss"] if gap else None
        tols[name] = tolerance(name, counted, a.get("train/dtype", "float32"), b.get("train/dtype", "float32"),
                               sds.get(name), gap)  # fmt: skip
        curves = (src.then(f"curves/{name}.csv"), src.now(f"curves/{name}.csv"))
        checks += compare_run(name, a, b, curves, tols[name])
    for name in study.baselines:
        a, b = src.json(path := f"metrics/{metrics_stem(name)}.json")
        if a is None or b is None:
            problems.append(f"baseline {name}: {path} is {'not committed' if a is None else 'missing here'}")
        else:
            checks += compare_classifier(f"baseline {name}", a, b)
    for name in study.finetune:
        a, b = src.json(path := f"{FINETUNE_METRICS}/{name}.json")
        if a is None or b is None:
            problems.append(f"finetune {name}: {path} is {'not committed' if a is None else 'missing here'}")
        else:
            checks += compare_classifier(f"finetune {name}", a, b, spread=a["seeds"]["sd"])
    then_claims = conclusions(study, then_all, tols)
    now_claims = conclusions(study, now_all, tols, noise=False)
    claims = [(k, v, now_claims.get(k, "(none)")) for k, v in then_claims.items()]
    return Verdict(case, machine, checks, claims, changed_files(root), problems)


def table(v: Verdict) -> str:
    """One row per run (its val loss shown; the verdict covers every number of the run), then what failed."""
    lines = ["| run | committed val loss | here | difference | tolerance | verdict |", "|---|---:|---:|---:|---:|---|"]
    by_run: dict[str, list[Check]] = {}
    for c in v.checks:
        by_run.setdefault(c.run, []).append(c)
    for run, cs in by_run.items():
        val = next((c for c in cs if c.number == "val/loss"), cs[0])
        bad = [c.number for c in cs if not c.ok]
        diff = val.difference()
        lines.append(
            f"| {run} | {val.committed:.6f} | {val.here:.6f} | {diff:+.2e} | {val.tolerance:.1e} | "
            + (f"**beyond**: {', '.join(bad)} |" if bad else ("same |" if diff == 0 else "within |"))
        )
    return "\n".join(lines)


def report(v: Verdict) -> str:
    """The whole text `lm verify` prints."""
    out = [f"Case: {v.case}" + (f" ({'; '.join(v.machine)})" if v.machine else ""), "", table(v), ""]
    for c in v.failed:
        out.append(f"BEYOND TOLERANCE: {c.run} {c.number}: committed {c.committed}, here {c.here} "
                   f"(allowed ±{c.tolerance:.2g}; {c.note})")  # fmt: skip
    for claim, then, now in v.flipped:
        out.append(f"CONCLUSION CHANGED: {claim}: committed '{then}', here '{now}'")
    out += [f"PROBLEM: {p}" for p in v.problems]
    if v.case.startswith("same") and v.changed:
        out.append("NOT BIT-IDENTICAL on the same machine class: " + ", ".join(v.changed))
    held = len(v.claims) - len(v.flipped)
    out.append(f"{len(v.checks) - len(v.failed)} of {len(v.checks)} numbers and {held} of {len(v.claims)} "
               "conclusions hold.")  # fmt: skip
    if v.ok:
        out.append("reproduced bit for bit" if not v.changed else "reproduced within tolerance")
    return "\n".join(out)
