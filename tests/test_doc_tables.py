"""Every Markdown table of the README, the docs and the history renders (a header, a
separator row of as many cells, rows of as many cells), and every relative link of
those pages points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs" / "history").glob("*.md")),
    *sorted((ROOT / "src" / "maediff" / "pretrained").glob("*.md")),
]
SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")


def cells(row: str) -> int:
    """Cells of one table row: pipes outside inline code, less the two outer ones."""
    row = re.sub(r"`[^`]*`", "", row.strip()).replace(r"\|", "")
    return row.count("|") - 1


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, rows) of each block of lines starting with '|', outside code."""
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    out, rows, start = [], [], 0
    for i, line in enumerate([*text.splitlines(), ""], 1):
        if line.lstrip().startswith("|"):
            if not rows:
                start = i
            rows.append(line.strip())
        elif rows:
            out.append((start, rows))
            rows = []
    return out


def table_problems(text: str) -> list[str]:
    problems = []
    for start, rows in tables(text):
        if len(rows) < 2 or not SEPARATOR.match(rows[1].replace(" ", "")):
            problems.append(f"line {start}: no separator row under the header")
            continue
        n = cells(rows[0])
        if cells(rows[1]) != n:
            problems.append(f"line {start + 1}: separator has {cells(rows[1])} cells, header {n}")
        for k, row in enumerate(rows[2:], 2):
            if cells(row) != n:
                problems.append(f"line {start + k}: {cells(row)} cells, header {n}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_renders(page):
    assert table_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_exists(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (page.parent / target).exists():
            missing.append(target)
    assert missing == []


def test_the_table_check_catches_what_it_should():
    good = "| a | b |\n|---|---|\n| 1 | `x|y` |\n"
    assert table_problems(good) == []
    assert table_problems("| a | b |\n |\n| 1 | 2 |\n")  # 0.9.0's broken separator
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n")
    assert table_problems("| a | b |\n|---|---|---|\n| 1 | 2 |\n")


def test_results_page_shows_one_release():
    """docs/results.md is this release's page; earlier releases live in docs/history/."""
    text = (ROOT / "docs" / "results.md").read_text()
    assert len(text.splitlines()) < 500
    history = sorted((ROOT / "docs" / "history").glob("*.md"))
    assert len(history) >= 5
    changelog = (ROOT / "CHANGELOG.md").read_text()
    for page in history:
        if page.name != "README.md":
            assert f"docs/history/{page.name}" in changelog, page.name
