"""The docs a reader follows: every relative link and image in README.md and docs/*.md resolves (a heading anchor
included), every `make` target and `lm` subcommand they name exists, README.md stays a map within its budget, no
function of lm/, stages/ or bench/ outgrows a screen, and no source document is cited by a name the repository
does not define (docs/sources.md names them)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lm.cli import build_parser

from tiny import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LINES = 250
"""README.md is the map (nanoGPT's is 234 lines); the depth is in docs/."""
FUNCTION_LINES = 60
"""A function longer than this is split into named steps."""
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`|^```[^\n]*\n(.*?)^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (hyphens and underscores kept), spaces to '-'."""
    text = re.sub(r"[`*_]{1,2}(?=\w)|(?<=\w)[`*_]{1,2}", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def link_problems(md: Path) -> list[str]:
    problems = []
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.M | re.S)  # links in code blocks are not links
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            problems.append(f"{md.relative_to(ROOT)}: {target} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{md.relative_to(ROOT)}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def code_spans(md: Path) -> list[str]:
    """Inline code and the lines of fenced code blocks."""
    out = []
    for inline, block in CODE.findall(md.read_text()):
        out += [inline] if inline else block.splitlines()
    return out


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def lm_commands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return set(sub.choices)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_images_resolve(md):
    assert link_problems(md) == []


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_make_targets_and_lm_commands_exist(md):
    targets, commands = make_targets(), lm_commands()
    named_make = {m for span in code_spans(md) for m in re.findall(r"(?:^|[;&|]\s*|\$ )make ([a-z][\w-]*)", span)}
    named_lm = {m for span in code_spans(md) for m in re.findall(r"(?:^|[;&|]\s*|\$ )lm ([a-z][\w-]*)", span)}
    assert named_make - targets == set(), f"{md.name} names make targets the Makefile lacks"
    assert named_lm - commands == set(), f"{md.name} names lm subcommands lm/cli.py lacks"


def test_the_checks_catch_a_broken_link_and_an_unknown_command(tmp_path):
    bad = ROOT / "docs" / "_planted_for_test.md"
    bad.write_text("# Title\n\n[gone](nothing-here.md), [anchor](../README.md#no-such-heading), `make nope`\n")
    try:
        assert len(link_problems(bad)) == 2
        assert {"nope"} - make_targets() == {"nope"} and "nope" in " ".join(code_spans(bad))
    finally:
        bad.unlink()


def test_readme_is_a_map_within_its_budget():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in text, f"README.md does not lead to docs/{doc.name}"


def test_sources_are_cited_by_their_names():
    """'seed' is a random seed only: no source document is cited as 'seed 00N', and none as STUDY.md, which the
    repository does not hold."""
    files = [*DOCS, *(p for d in ("lm", "stages", "bench", "tests") for p in (ROOT / d).rglob("*.py"))]
    files += [
        ROOT / "params.yaml",
        *(ROOT / "presets").glob("*.yaml"),
        ROOT / "dvc.yaml",
        *(ROOT / "reports").rglob("*.md"),
    ]
    this = Path(__file__).resolve()
    bad = re.compile(r"seeds? 00\d|STUDY\.md", re.I)
    assert [f"{p.relative_to(ROOT)}" for p in files if p.resolve() != this and bad.search(p.read_text())] == []


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(p for d in ("lm", "stages", "bench") for p in (ROOT / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
