"""Where a result comes from: the code a stage runs, the md5 DVC records of its inputs and outputs, and the git state.

- The project files a module imports, directly or transitively, imports inside functions included (read from the
  source with ast, nothing is imported), and a digest of them: the check stage writes it per stage module
  (code/<module>.txt), every stage of dvc.yaml depends on its module's (`tests/test_dvc_deps.py` checks it), and
  the train stage's resume fingerprint includes it, so a state saved by other code is never resumed.
- DVC 3's md5 of a file or folder (what dvc.lock records) and the git commit and dirty state: the lineage tags of
  every stage's MLflow run (stages/mlflow_run.py).
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
"""The project root: the folder holding the `lm` and `stages` packages."""
PACKAGES = ("lm", "stages")
"""Top-level packages of the project: imports of anything else (torch, mlflow, ...) are not followed."""
EXEMPT = {
    "lm/tracking.py": "it only logs to MLflow: no output of any stage depends on it, so editing how runs are "
    "logged must not re-run the study",
    "lm/references.py": "params validation reads its keys, but only the report writes a published number: adding "
    "or correcting one re-runs the report, not the training",
    "stages/mlflow_run.py": "it only names, tags and groups a stage's MLflow run (the stage side of lm/tracking.py)",
    "lm/threads.py": "it only sets how long torch's OpenMP threads spin before they sleep: the same threads split the "
    "same work whatever the wait, so tuning it changes speed, never an output",
}
"""Files a stage imports that are deliberately not deps (nor part of the code digest), each with the reason."""
NEEDED_BY = {"lm/references.py": ("stages.report",)}
"""Exempt files that are still deps of these stage modules (whose outputs do show them)."""


def exempt(module: str) -> set[str]:
    """The files of `module`'s import closure that are not its deps (:data:`EXEMPT` but :data:`NEEDED_BY`)."""
    return {f for f in EXEMPT if module not in NEEDED_BY.get(f, ())}


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None if it is not ours."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every project module `path` (the file of `module`) imports, anywhere in it, with their parent packages."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.read_text()
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..y import z
                parts = package.split(".")
                src = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                src = node.module
            found.add(src)
            found.update(f"{src}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    if path.name == "__init__.py" and "iter_modules" in source:
        # A package that imports all its modules at import time (lm.models finds its families this way).
        found.update(f"{module}.{p.stem}" for p in path.parent.glob("*.py") if p.name != "__init__.py")
    with_parents = {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 2)}
    return {m for m in with_parents if m.split(".")[0] in PACKAGES}


def import_closure(module: str, root: Path = ROOT, *, stop: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Project files (paths relative to `root`) that `python -m module` executes; the imports of the files in
    `stop` are not followed (they are in the result, what only they import is not)."""
    todo = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)]
    seen: set[str] = set()
    files: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is not None:
            rel = path.relative_to(root).as_posix()
            files.add(rel)
            if rel not in stop:
                todo.extend(imported_modules(path, name) - seen)
    return files


def code_deps(module: str, root: Path = ROOT) -> set[str]:
    """The project files `python -m module` depends on: its import closure without the exempt files and what only
    they import (an exempt file is not a dep, so neither is the code it alone brings in)."""
    skip = exempt(module)
    return import_closure(module, root, stop=skip) - skip


def code_digests(module: str, root: Path = ROOT) -> dict[str, str]:
    """sha256 of every file `module` depends on (:func:`code_deps`), by relative path."""
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in sorted(code_deps(module, root))}


def code_manifest(module: str, root: Path = ROOT) -> str:
    """:func:`code_digests` as `sha256sum` writes them (`sha256sum -c` checks the files against it): the file each
    stage of dvc.yaml depends on in place of its code files, so dvc.lock records one line per stage, not one per
    file (DVC rewrites the whole lock file after every stage)."""
    return "".join(f"{digest}  {file}\n" for file, digest in code_digests(module, root).items())


def manifest_module(path: Path | str) -> str:
    """The stage module a code manifest is named after: code/stages.train.txt → stages.train."""
    return Path(path).name.removesuffix(".txt")


# ----------------------------------------------------------------------------------------------
# DVC's md5 and the git state (the lineage tags of every stage's MLflow run)


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_md5(root: Path, files: Iterable[Path]) -> str:
    """DVC 3's directory hash of `files` (below `root`): md5 of the JSON list of {md5, relpath} sorted
    by relpath, plus '.dir' (dvc_data's Tree.digest)."""
    entries = sorted(
        ({"md5": _file_md5(p), "relpath": p.relative_to(root).as_posix()} for p in files), key=lambda e: e["relpath"]
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


DVCIGNORE = ("__pycache__/", ".*.lock", ".*.resume/")
"""The project's .dvcignore patterns (tests/test_dvc_deps.py checks they agree): DVC hashes a directory without the
files they match (a trainer's lock file and resumable state beside its output), and so does :func:`dvc_md5`."""


def dvc_ignored(relpath: PurePosixPath) -> bool:
    """Whether a file (its path inside the hashed directory) matches :data:`DVCIGNORE` (gitignore-style: a pattern
    without a slash matches a name at any depth; a trailing slash, a directory's)."""
    for pattern in DVCIGNORE:
        names = relpath.parts[:-1] if pattern.endswith("/") else relpath.parts
        if any(fnmatch.fnmatchcase(name, pattern.rstrip("/")) for name in names):
            return True
    return False


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records in dvc.lock for a file or a directory (without what .dvcignore ignores), so a
    run's ``dvc.dep.*`` / ``dvc.out.*`` tags compare with dvc.lock, and across runs."""
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    files = (
        p for p in path.rglob("*") if p.is_file() and not dvc_ignored(PurePosixPath(p.relative_to(path).as_posix()))
    )
    return tree_md5(path, files)


def git_state(root: Path, inputs: Sequence[str]) -> dict[str, str]:
    """``git.commit`` (also as MLflow's ``mlflow.source.git.commit``) and ``git.dirty``: whether the
    `inputs` (paths that define a run: code, dvc.yaml, params.yaml) differ from the commit, untracked
    files included. Pipeline outputs are left out on purpose: the pipeline itself rewrites dvc.lock and
    metrics/ mid-repro, which would make every later stage 'dirty'. Empty outside a git repository."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        # Porcelain lines are 'XY path' and X may be a space (' M params.yaml'): never strip them.
        changed = git("status", "--porcelain", "--untracked-files=normal", "--", *inputs).splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "git.dirty": str(bool(changed)).lower(),
        **({"git.dirty_files": " ".join(line[3:] for line in changed)[:4000]} if changed else {}),
    }
