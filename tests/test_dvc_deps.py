"""dvc.yaml declares exactly the code each stage runs: every project file its command imports (directly or
transitively, imports inside functions included) is a dep, and no code dep is one it does not import.

A missing dep lets `dvc repro` keep a stale result after that file is edited; an extra one re-runs stages for
nothing. The closure is computed from the source (ast), starting at the module of the stage's
`python -m <module>` command.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lm", "stages")
"""Top-level packages of the project: imports of anything else (torch, mlflow, ...) are not followed."""

EXEMPT = {
    "lm/tracking.py": "it only logs to MLflow: no output of any stage depends on it, so editing how runs are "
    "logged must not re-run the study",
}
"""Files a stage imports that are deliberately not deps, each with the reason."""


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None if it is not ours."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module `path` (the file of `module`) imports, anywhere in it (functions included), with parents."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..y import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module
            found.add(src)
            found.update(f"{src}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    if path.name == "__init__.py" and "iter_modules" in path.read_text():
        # A package that imports all its modules at import time (lm.models finds its families this way).
        found.update(f"{module}.{p.stem}" for p in path.parent.glob("*.py") if p.name != "__init__.py")
    with_parents = set()
    for name in found:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in with_parents if m.split(".")[0] in PACKAGES}


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    """Project files (relative paths) executed by `python -m module`."""
    todo = [p for i in range(1, module.count(".") + 2) if (p := ".".join(module.split(".")[:i]))]
    seen: set[str] = set()
    files: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            continue
        files.add(path.relative_to(root).as_posix())
        todo.extend(imported_modules(path, name) - seen)
    return files


def stage_commands(dvc_yaml: dict) -> dict[str, tuple[str, list[str]]]:
    """Stage name → (the module its cmd runs, its deps as written)."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage)
        match = re.search(r"python -m ([\w.]+)", body["cmd"])
        assert match, f"stage {name}: cmd {body['cmd']!r} does not run `python -m <module>`"
        out[name] = (match[1], [str(d) for d in body.get("deps", [])])
    return out


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def dep_problems(dvc_yaml: dict, root: Path = ROOT) -> list[str]:
    """One line per missing or unneeded code dep, naming the stage and the fix."""
    problems = []
    for stage, (module, deps) in stage_commands(dvc_yaml).items():
        closure = import_closure(module, root)
        for file in sorted(closure - set(EXEMPT)):
            if not covered(file, deps):
                problems.append(f"{stage}: `python -m {module}` imports {file}; add it to the stage's deps")
        for dep in deps:
            if dep.split("/")[0] in PACKAGES and not any(covered(f, [dep]) for f in closure - set(EXEMPT)):
                problems.append(f"{stage}: dep {dep} is code the stage never imports; remove it")
    return problems


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_exactly_the_code_it_imports(dvc_yaml):
    assert dep_problems(dvc_yaml) == []


def test_exemptions_are_imported_and_not_deps(dvc_yaml):
    """Each exemption is real: some stage imports the file, and no stage lists it."""
    for file in EXEMPT:
        assert any(file in import_closure(module) for module, _ in stage_commands(dvc_yaml).values()), file
        assert not any(covered(file, deps) for _, deps in stage_commands(dvc_yaml).values()), file


@pytest.mark.parametrize("stage", ["fetch", "tokenize", "train", "evaluate", "report"])
def test_removing_any_code_dep_is_caught(dvc_yaml, stage):
    """The check fails when a dep is removed: drop each code dep of the stage in turn."""
    body = dvc_yaml["stages"][stage].get("do", dvc_yaml["stages"][stage])
    code = [d for d in body["deps"] if str(d).split("/")[0] in PACKAGES]
    assert code
    for dep in code:
        body["deps"].remove(dep)
        try:
            problems = dep_problems(dvc_yaml)
            assert problems and all(stage in p for p in problems), (dep, problems)
            assert any(dep in p or p.split(" imports ")[-1].startswith(dep) for p in problems), (dep, problems)
        finally:
            body["deps"].insert(0, dep)


def test_an_import_inside_a_function_counts(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "__init__.py").write_text("")
    (tmp_path / "lm" / "a.py").write_text("def f():\n    from lm import b\n    return b\n")
    (tmp_path / "lm" / "b.py").write_text("import lm.c as c\n")
    (tmp_path / "lm" / "c.py").write_text("import torch\n")
    (tmp_path / "lm" / "unused.py").write_text("")
    assert import_closure("lm.a", tmp_path) == {"lm/__init__.py", "lm/a.py", "lm/b.py", "lm/c.py"}
