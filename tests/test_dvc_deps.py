"""dvc.yaml declares exactly the code each stage runs. Every stage but `check` depends on the code manifest of the
module its command runs, code/<module>.txt, and on no code file itself; the check stage depends on all of lm/ and
stages/ and writes every manifest (the sha256 of each project file the module imports, directly or transitively,
imports inside functions included: lm.provenance.code_manifest).

A file missing from a manifest lets `dvc repro` keep a stale result after that file is edited; an extra one re-runs
stages for nothing. The closure (lm/provenance.py) is computed from the source, starting at the module of the
stage's `python -m <module>` command; its exemptions (lm.provenance.EXEMPT) each say why.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lm.provenance import EXEMPT, NEEDED_BY, PACKAGES, ROOT, code_deps, code_manifest, import_closure

CHECK = "check"


def stage_commands(dvc_yaml: dict) -> dict[str, tuple[str, list[str]]]:
    """Stage name → (the module its cmd runs, its deps as written)."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage)
        match = re.search(r"python -m ([\w.]+)", body["cmd"])
        assert match, f"stage {name}: cmd {body['cmd']!r} does not run `python -m <module>`"
        out[name] = (match[1], [str(d) for d in body.get("deps", [])])
    return out


def manifests_written(dvc_yaml: dict) -> tuple[list[str], list[str]]:
    """The check stage's code manifests: as its cmd's --code names them, and as its outs."""
    body = dvc_yaml["stages"][CHECK]
    named = re.search(r"--code((?:\s+code/\S+)*)", body["cmd"])
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in body["outs"]]
    return (named[1].split() if named else []), [o for o in outs if o.startswith("code/")]


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def dep_problems(dvc_yaml: dict, root: Path = ROOT) -> list[str]:
    """One line per missing, misplaced or unneeded code dep, naming the stage and the fix."""
    problems = []
    commands = stage_commands(dvc_yaml)
    named, written = manifests_written(dvc_yaml)
    if named != written:
        problems.append(f"{CHECK}: its cmd writes {named} but its outs are {written}; list the same files")
    used = set()
    for stage, (module, deps) in commands.items():
        if stage == CHECK:
            continue
        for dep in deps:
            if dep.split("/")[0] in PACKAGES:
                problems.append(f"{stage}: dep {dep} is code; depend on code/{module}.txt instead")
        want = f"code/{module}.txt"
        used.add(want)
        if want not in deps:
            problems.append(f"{stage}: `python -m {module}` needs the dep {want} (the code it runs)")
        for dep in deps:
            if dep.startswith("code/") and dep != want:
                problems.append(f"{stage}: dep {dep} is another module's code manifest; remove it")
        if want not in written:
            problems.append(f"{CHECK}: does not write {want}, which {stage} depends on; add it to its --code and outs")
    problems += [f"{CHECK}: writes {m}, which no stage depends on; remove it" for m in written if m not in used]
    check_module, check_deps = commands[CHECK]
    needed = import_closure(check_module, root).union(*(import_closure(m[5:-4], root) for m in written))
    problems += [f"{CHECK}: the code it reads or digests includes {f}; add it to its deps"
                 for f in sorted(needed) if not covered(f, check_deps)]  # fmt: skip
    return problems


@pytest.fixture(scope="module")
def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_exactly_the_code_it_imports(dvc_yaml):
    assert dep_problems(dvc_yaml) == []


@pytest.mark.parametrize("stage", ["fetch", "tokenize", "train", "evaluate", "report"])
def test_a_wrong_code_dep_is_caught(dvc_yaml, stage):
    """Each way of getting a stage's code dep wrong fails the check, naming the stage."""
    body = dvc_yaml["stages"][stage].get("do", dvc_yaml["stages"][stage])
    module = re.search(r"python -m ([\w.]+)", body["cmd"])[1]
    mine = f"code/{module}.txt"
    other = next(m for m in manifests_written(dvc_yaml)[1] if m != mine)
    edits = {
        "no manifest": lambda deps: deps.remove(mine),
        "another module's manifest": lambda deps: deps.__setitem__(deps.index(mine), other),
        "a code file listed itself": lambda deps: deps.append("lm/config.py"),
    }
    for what, edit in edits.items():
        deps = list(body["deps"])
        edit(body["deps"])
        try:
            problems = dep_problems(dvc_yaml)
            assert any(p.startswith(f"{stage}:") for p in problems), (what, problems)
        finally:
            body["deps"] = deps


def test_the_check_stage_must_depend_on_all_the_code_and_write_every_manifest(dvc_yaml):
    body = dvc_yaml["stages"][CHECK]
    deps, cmd = list(body["deps"]), body["cmd"]
    body["deps"].remove("lm")
    assert any("add it to its deps" in p and "lm/" in p for p in dep_problems(dvc_yaml))
    body["deps"] = deps
    body["cmd"] = cmd.replace(" code/stages.report.txt", "")
    assert any("its cmd writes" in p for p in dep_problems(dvc_yaml))
    body["cmd"] = cmd


def test_a_manifest_lists_the_module_s_code_as_sha256sum_checks_it(tmp_path):
    """One `sha256  path` line per file of the closure (exempt files out), which the real `sha256sum -c` accepts,
    and rejects once a listed file changes."""
    text = code_manifest("stages.train")
    files = [line.split("  ", 1)[1] for line in text.splitlines()]
    assert files == sorted(code_deps("stages.train")) and "lm/trainer.py" in files and "lm/tracking.py" not in files
    assert all(re.fullmatch(r"[0-9a-f]{64}  \S+", line) for line in text.splitlines())
    if shutil.which("sha256sum"):
        (tmp_path / "m.txt").write_text(text)
        assert subprocess.run(["sha256sum", "--quiet", "-c", tmp_path / "m.txt"], cwd=ROOT).returncode == 0
    first = files[0]
    stale = text.replace(hashlib.sha256((ROOT / first).read_bytes()).hexdigest(), "0" * 64, 1)
    (tmp_path / "m.txt").write_text(stale)
    if shutil.which("sha256sum"):
        r = subprocess.run(["sha256sum", "-c", tmp_path / "m.txt"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1 and f"{first}: FAILED" in r.stdout


@pytest.mark.parametrize(
    ("edited", "changed"),
    [
        ("lm/trainer.py", {"stages.train"}),
        ("lm/report/tables.py", {"stages.report"}),
        ("lm/references.py", {"stages.report"}),
        ("lm/config.py", {"stages.fetch", "stages.tokenize", "stages.train", "stages.evaluate", "stages.report"}),
        ("lm/tracking.py", set()),
    ],
)
def test_an_edit_changes_the_manifests_of_exactly_the_stages_that_run_it(tmp_path, edited, changed):
    modules = ["stages.fetch", "stages.tokenize", "stages.train", "stages.evaluate", "stages.report"]
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {m: code_manifest(m, tmp_path) for m in modules}
    with open(tmp_path / edited, "a") as f:
        f.write("\n# an edit\n")
    assert {m for m in modules if code_manifest(m, tmp_path) != before[m]} == changed


def test_the_check_stage_writes_the_manifests_and_refuses_a_name_that_is_no_module(tmp_path, capsys):
    import stages.check

    out = tmp_path / "code" / "stages.train.txt"
    stages.check.main(["--out", str(tmp_path / "ok"), "--code", str(out), "--tokenizers", str(tmp_path)])
    assert out.read_text() == code_manifest("stages.train") and (tmp_path / "ok").read_text() == "ok\n"
    with pytest.raises(SystemExit) as e:
        stages.check.main(["--out", str(tmp_path / "ok2"), "--code", str(tmp_path / "stages.trian.txt")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "stages.trian.txt" in err and "code/<module>.txt" in err
    assert not (tmp_path / "ok2").exists()


def test_exemptions_are_imported_and_in_no_manifest_but_their_readers(dvc_yaml):
    """Each exemption is real: some stage imports the file, and only the modules NEEDED_BY names list it."""
    modules = {module for module, _ in stage_commands(dvc_yaml).values()}
    for file in EXEMPT:
        assert any(file in import_closure(module) for module in modules), file
        for module in modules - {"stages.check"}:
            assert (file in code_deps(module)) == (module in NEEDED_BY.get(file, ())), (file, module)


def test_an_import_inside_a_function_counts(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "__init__.py").write_text("")
    (tmp_path / "lm" / "a.py").write_text("def f():\n    from lm import b\n    return b\n")
    (tmp_path / "lm" / "b.py").write_text("import lm.c as c\n")
    (tmp_path / "lm" / "c.py").write_text("import torch\n")
    (tmp_path / "lm" / "unused.py").write_text("")
    assert import_closure("lm.a", tmp_path) == {"lm/__init__.py", "lm/a.py", "lm/b.py", "lm/c.py"}


def test_dvc_md5_ignores_what_dvcignore_ignores_as_dvc_does(tmp_path, repo_root):
    """A run's dvc.dep.* tag must equal what dvc.lock records. The report depends on models/, which holds each
    trainer's lock file (its pid) and, mid-run, its resumable state: DVC hashes it without them (.dvcignore), so
    lm.provenance.dvc_md5 must too, or the tag changes with every pid."""
    from lm.provenance import DVCIGNORE, dvc_md5

    patterns = [ln for ln in (repo_root / ".dvcignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert sorted(patterns) == sorted(DVCIGNORE)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    shutil.copy(repo_root / ".dvcignore", tmp_path / ".dvcignore")
    models = tmp_path / "models"
    for rel, text in [("a/model.bin", "w"), (".a.lock", "123\n"), (".a.resume/state.pt", "s"), ("b/.b.lock", "9"),
                      ("b/config.json", "{}"), ("__pycache__/x.pyc", "c")]:  # fmt: skip
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_text(text)
    subprocess.run(["dvc", "add", "-q", "models"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "models.dvc").read_text())["outs"][0]["md5"]
    assert dvc_md5(models) == recorded
    (models / ".a.lock").write_text("456\n")  # another trainer's pid: the same hash
    assert dvc_md5(models) == recorded
