"""What the README and docs show exists: every `maediff ...` command in their bash
blocks parses (subcommand and flags), and every preset they name is a preset."""

import re
import shlex
from pathlib import Path

import pytest

from maediff.cli import build_parser
from maediff.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(path: Path) -> list[str]:
    text = path.read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|\|\||;", line):
                part = part.strip()
                m = re.search(r"(?:^|-m )maediff (.*)$", part)
                if m and not part.startswith("pip"):
                    out.append(m.group(1))
    return out


ALL = [(p.name, c) for p in DOCS for c in _commands(p)]


def test_the_docs_show_commands():
    names = {n for n, _ in ALL}
    assert "README.md" in names and len(ALL) >= 10


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[:40]}" for d, c in ALL])
def test_documented_command_parses(doc, command):
    argv = shlex.split(command)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown command or flag
        raise AssertionError(f"{doc}: `maediff {command}` does not parse") from e
    for flag in ("preset",):
        value = getattr(args, flag, None)
        if value is not None:
            assert value in PRESETS


def test_readme_opens_with_the_demo_and_the_test_command():
    lines = [
        ln
        for ln in (ROOT / "README.md").read_text().splitlines()
        if ln.startswith("python3 -m venv")
    ]
    assert "maediff demo" in lines[0]
    assert "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '^python3 -m venv .*pytest' README.md" in ci
