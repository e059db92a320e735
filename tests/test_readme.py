"""The README and docs/ cannot go stale silently: every path they name exists, every command parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from synpref.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `synpref <subcommand> --config FILE [more args]` up to the end of the command (a comment, a pipe, a backtick).
COMMAND = re.compile(r"synpref (fit|validate|test|predict|reproduce) +((?:--config +[^\s`|]+ *)+)")


def doc_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_readme_is_short_and_has_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    quick = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert quick == [
        'pip install torch==2.13.0 && pip install -e ".[dev]" && synpref reproduce --config configs/tiny/paper.yaml',
        "python -m pytest -q",
    ]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci  # CI runs the README's test command


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_named_paths_exist(doc):
    text = doc.read_text(encoding="utf-8")
    named = set(
        re.findall(
            r"(?<![\w/.])((?:configs|benchmarks|docs|tests|synpref|callbacks)/[\w./-]+\.(?:ya?ml|py|md|jsonl))", text
        )
    )
    named |= {
        (doc.parent / link).resolve().relative_to(ROOT).as_posix() for link in re.findall(r"\]\(([^)#:]+)\)", text)
    }
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc_id(doc)} names paths that do not exist: {missing}"


def commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for sub, configs in COMMAND.findall(doc.read_text(encoding="utf-8")):
            paths = shlex.split(configs)[1::2]
            if all(p.startswith("configs/") for p in paths):  # skip placeholders like my_overrides.yaml
                found.append((doc_id(doc), sub, paths))
    return sorted({(d, s, tuple(p)) for d, s, p in found})


def test_commands_are_found():
    subs = {s for _, s, _ in commands()}
    assert {"fit", "predict", "reproduce"} <= subs


@pytest.mark.parametrize("doc,sub,paths", commands(), ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_command_parses(doc, sub, paths, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [sub]
    for p in paths:
        args += ["--config", p]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None), f"{doc}: synpref {' '.join(args)}\n{capsys.readouterr().err[-2000:]}"
    assert capsys.readouterr().out.strip(), "nothing printed"
