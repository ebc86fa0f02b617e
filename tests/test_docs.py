"""What the README and docs show exists: every `maediff ...` command in their bash
blocks parses (subcommand and flags), every preset they name is a preset, and every
`python benchmarks/<script>.py ...` command names a script whose own parser takes it."""

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from maediff.cli import build_parser
from maediff.config import apply_overrides, get_preset, preset_names

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shell_parts(path: Path) -> list[str]:
    """Each simple command of the file's bash blocks (continuations joined, comments cut)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            out += [p.strip() for p in re.split(r"&&|\|\||;", line) if p.strip()]
    return out


def _commands(path: Path) -> list[str]:
    out = []
    for part in _shell_parts(path):
        m = re.search(r"(?:^|-m )maediff (.*?)\s*&?$", part)
        if m and not part.startswith("pip"):
            out.append(m.group(1))
    return out


def _script_commands(path: Path) -> list[str]:
    """`python benchmarks/...` in bash blocks and in inline code of the text."""
    out = []
    for part in _shell_parts(path):
        m = re.search(r"(?:^|\s)python3? (benchmarks/\S+\.py.*?)\s*&?$", part)
        if m:
            out.append(m.group(1))
    prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    out += [" ".join(c.split()) for c in re.findall(r"`python3? (benchmarks/[^`]+)`", prose)]
    return out


ALL = [(p.name, c) for p in DOCS for c in _commands(p)]
SCRIPTS = [(p.name, c) for p in DOCS for c in _script_commands(p)]


def test_the_docs_show_commands():
    names = {n for n, _ in ALL}
    assert "README.md" in names and len(ALL) >= 10


def check_command(command: str) -> None:
    """A documented command: it parses, every preset it names (--preset, or a
    `--scale`d model of `benchmark --models`) exists, and its --set overrides apply to
    that preset's configuration. Raises AssertionError (or ValueError) otherwise."""
    argv = shlex.split(command)
    for i, tok in enumerate(argv[:-1]):  # read from the text: argparse's choices come later
        if tok == "--preset":
            assert argv[i + 1] in preset_names(), f"preset {argv[i + 1]!r} does not exist"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown command, flag or choice
        raise AssertionError(f"`maediff {command}` does not parse") from e
    sets = [s for s in (getattr(args, "set", None) or []) if "=" in s]
    if sets and args.command in ("train", "demo", "benchmark"):
        preset = getattr(args, "preset", None) or "cpu"
        apply_overrides(get_preset(preset), sets)  # raises on an unknown key or bad value


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[:40]}" for d, c in ALL])
def test_documented_command_parses(doc, command):
    try:
        check_command(command)
    except (AssertionError, ValueError) as e:
        raise AssertionError(f"{doc}: {e}") from e


@pytest.mark.parametrize(
    "command",
    [
        "train --data d --run r --preset maediff-huge",  # no such preset
        "demo --set unet.nope=1",  # no such config key
        "benchmark --table 1 --scale cpu --frobnicate",  # no such flag
        "frobnicate --data d",  # no such subcommand
    ],
)
def test_the_command_check_catches_what_it_should(command):
    with pytest.raises((AssertionError, ValueError)):
        check_command(command)


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


def test_readme_first_screen_is_one_results_table_then_the_tour():
    text = (ROOT / "README.md").read_text()
    first = text.split("\n## ", 1)[0]
    assert first.count("\n|---|") == 1, "one results table before the tour"
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in first
    headings = re.findall(r"^## (.*)$", text, flags=re.M)
    assert headings[0] == "A short tour", headings


class _Parsed(Exception):
    pass


def check_script_command(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A documented `python benchmarks/X.py ...`: the script exists and its argument parser
    accepts the arguments; the script stops right after parsing, nothing runs."""
    script, *argv = shlex.split(command)
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        m.setattr(sys, "argv", [str(path), *argv])
        m.syspath_prepend(str(path.parent))
        try:
            runpy.run_path(str(path), run_name="__main__")
        except _Parsed:
            return
        except SystemExit as e:
            raise AssertionError(f"`python {command}` does not parse") from e
    raise AssertionError(f"{script} ran without parsing its arguments")


def test_the_docs_show_benchmark_commands():
    docs = {d for d, _ in SCRIPTS}
    assert len(SCRIPTS) >= 8 and {"README.md", "results.md"} <= docs


@pytest.mark.parametrize("doc, command", SCRIPTS, ids=[f"{d}:{c[:50]}" for d, c in SCRIPTS])
def test_documented_benchmark_command_parses(doc, command, monkeypatch):
    try:
        check_script_command(command, monkeypatch)
    except AssertionError as e:
        raise AssertionError(f"{doc}: {e}") from e


@pytest.mark.parametrize(
    "command",
    [
        "benchmarks/learning_curve.py --data d --out o --frobnicate",  # no such flag
        "benchmarks/bench_speed.py --amp fp8",  # no such choice
        "benchmarks/no_such_script.py --data d",
    ],
)
def test_the_benchmark_command_check_catches_what_it_should(command, monkeypatch):
    with pytest.raises(AssertionError):
        check_script_command(command, monkeypatch)
