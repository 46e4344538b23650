"""dvc.yaml declares exactly the code each stage runs: every project file its command imports (directly or
transitively, imports inside functions included) is a dep, and no code dep is one it does not import.

A missing dep lets `dvc repro` keep a stale result after that file is edited; an extra one re-runs stages for
nothing. The closure (lm/provenance.py) is computed from the source, starting at the module of the stage's
`python -m <module>` command; its exemptions (lm.provenance.EXEMPT) each say why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lm.provenance import EXEMPT, NEEDED_BY, PACKAGES, ROOT, code_deps, import_closure


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
        needed = code_deps(module, root)
        for file in sorted(needed):
            if not covered(file, deps):
                problems.append(f"{stage}: `python -m {module}` imports {file}; add it to the stage's deps")
        for dep in deps:
            if dep.split("/")[0] in PACKAGES and not any(covered(f, [dep]) for f in needed):
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
        for module, deps in stage_commands(dvc_yaml).values():
            assert covered(file, deps) == (module in NEEDED_BY.get(file, ())), (file, module)


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
