"""docs/DIRECTIVES.md is generated from the directive table and kept in step with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forkgw.conf import directives as table
from forkgw.conf.lexer import Source, parse_statements

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "DIRECTIVES.md"


def test_committed_doc_matches_the_table():
    assert DOC.read_text(encoding="utf-8") == table.render_markdown(), (
        "docs/DIRECTIVES.md is out of date: python -m forkgw.conf.directives > docs/DIRECTIVES.md")


def test_generator_and_checker_run_as_a_script():
    run = [sys.executable, "-W", "error", "-m", "forkgw.conf.directives"]
    generated = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=True)
    assert generated.stdout == table.render_markdown() and generated.stderr == ""
    assert subprocess.run([*run, "--check", str(DOC)], cwd=ROOT).returncode == 0


def test_checker_reports_a_stale_doc(tmp_path):
    stale = tmp_path / "DIRECTIVES.md"
    stale.write_text("# old\n")
    assert table.main(["--check", str(stale)]) == 1


@pytest.mark.parametrize("directive", table.DIRECTIVES, ids=lambda d: f"{d.name}-{d.contexts[0]}")
def test_every_directive_is_documented_with_a_valid_example(directive):
    assert directive.description and directive.syntax and set(directive.contexts) <= set(table.CONTEXTS)
    [example] = parse_statements(directive.example, Source("example"))
    assert example.name == directive.name
    assert directive.takes(len(example.args))
    assert (example.block is not None) == (directive.block is not None)
    assert f"## {directive.name}" in table.render_markdown()


@pytest.mark.parametrize("directive", [d for d in table.DIRECTIVES if d.name not in ("module", "include")],
                         ids=lambda d: f"{d.name}-{d.contexts[0]}")
def test_examples_and_defaults_parse(directive, tmp_path):
    ctx = table.v.Ctx(directive.name, "example", str(tmp_path))
    [example] = parse_statements(directive.example, Source("example"))
    directive.parse(list(example.args), ctx)
    if directive.default is not None:
        [default] = parse_statements(f"{directive.name} {directive.default};", Source("default"))
        directive.parse(list(default.args), ctx)
