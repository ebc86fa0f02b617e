"""What the README and docs show exists: every `maediff ...` command in their bash
blocks parses (subcommand and flags), and every preset they name is a preset."""

import re
import shlex
from pathlib import Path

import pytest

from maediff.cli import build_parser
from maediff.config import apply_overrides, get_preset, preset_names

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
