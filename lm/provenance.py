"""What code a stage runs: the project files a module imports, directly or transitively, imports inside functions
included (read from the source with ast, nothing is imported), and a digest of them.

Two users: `tests/test_dvc_deps.py` checks that every stage of dvc.yaml depends on exactly these files, and the
train stage's resume fingerprint includes their digest, so a state saved by other code is never resumed.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The project root: the folder holding the `lm` and `stages` packages."""
PACKAGES = ("lm", "stages")
"""Top-level packages of the project: imports of anything else (torch, mlflow, ...) are not followed."""
EXEMPT = {
    "lm/tracking.py": "it only logs to MLflow: no output of any stage depends on it, so editing how runs are "
    "logged must not re-run the study",
}
"""Files a stage imports that are deliberately not deps (nor part of the code digest), each with the reason."""


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


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    """Project files (paths relative to `root`) that `python -m module` executes."""
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
            files.add(path.relative_to(root).as_posix())
            todo.extend(imported_modules(path, name) - seen)
    return files


def code_digests(module: str, root: Path = ROOT) -> dict[str, str]:
    """sha256 of every file of the import closure of `module` but the exempt ones, by relative path."""
    files = sorted(import_closure(module, root) - set(EXEMPT))
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}
