"""The report of saved evaluations (reporting/runs.py, docs/evaluation.md §4): images
that resolve from the page, rows per model and data folder, and no torch."""

import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from maediff.config import get_preset
from maediff.models import build_model
from maediff.reporting.runs import load_summary, table_rows, write_report
from test_protocol_parity import IdentityModel, _evaluate, write_layout


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def image_paths(page: Path) -> list[Path]:
    """Every <img src> of a page, resolved against the page's own folder."""
    parser = _Images()
    parser.feed(page.read_text())
    return [page.parent / unquote(src) for src in parser.srcs]


def assert_images_resolve(page: Path, at_least: int) -> None:
    paths = image_paths(page)
    assert len(paths) >= at_least
    for p in paths:
        assert p.is_file(), f"{page}: <img src> {p} does not exist"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_images_resolve_relative_to_the_page(tmp_path, monkeypatch):
    write_layout(tmp_path / "data", n_val=1, n_test=2)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    # relative data and output folders, as a user types them
    kw = {"datasets": ("Brats21",), "healthy_test": False}
    thresh = build_model(replace(get_preset("thresh"), data=IdentityModel().cfg.data))
    _evaluate(thresh, "../data", "runs/eval-thresh", label="Thresh", **kw)
    _evaluate(IdentityModel(), "../data", "runs/eval-identity", label="Identity", **kw)
    assert_images_resolve(Path("runs/eval-thresh/report.html"), at_least=3)

    # the report of both, written from yet another working directory
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    summaries = [load_summary(f"../work/runs/eval-{n}") for n in ("thresh", "identity")]
    page = write_report(summaries, "../work/report")
    assert page == Path("../work/report/report.html")
    # combined PR and Dice figures, and each evaluation's 3 figures copied next to the page
    assert_images_resolve(page, at_least=2 + 2 * 3)
    assert all(p.resolve().parent == page.resolve().parent for p in image_paths(page))
    assert "src='2-Identity_examples_Brats21.png'" in page.read_text()
    # the folder can be moved: nothing points outside it
    moved = (tmp_path / "moved").resolve()
    Path("../work/report").rename(moved)
    assert_images_resolve(moved / "report.html", at_least=8)


def _summary(label, data_dir, dice):
    return {
        "model": label,
        "data_dir": data_dir,
        "fold": 0,
        "datasets": {"Brats21": {"metrics": {"dice": {"mean": dice, "std": 0.0, "n": 5}}}},
    }


def test_rows_group_by_model_and_data_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = str(tmp_path / "synthetic-a"), "synthetic-b"  # absolute and relative
    runs = [
        _summary("MAEDiff", a, 0.40),
        _summary("MAEDiff", "synthetic-a/../synthetic-a", 0.50),  # the same folder
        _summary("MAEDiff", b, 0.90),
        _summary("Thresh", b, 0.20),
    ]
    rows, datasets = table_rows(runs)
    assert datasets == ["Brats21"]
    got = {r["model"]: r["Brats21"]["dice"] for r in rows}
    assert set(got) == {
        "MAEDiff — synthetic-a (2 runs)",
        "MAEDiff — synthetic-b",
        "Thresh — synthetic-b",
    }
    assert got["MAEDiff — synthetic-a (2 runs)"]["mean"] == pytest.approx(0.45)
    assert got["MAEDiff — synthetic-a (2 runs)"]["std"] == pytest.approx(0.05 * 2**0.5)  # ddof 1
    assert got["MAEDiff — synthetic-b"]["mean"] == 0.90
    # one data folder: rows carry the model label only, runs are combined
    rows, _ = table_rows(runs[:2])
    assert [r["model"] for r in rows] == ["MAEDiff (2 runs)"]
    # two folders with the same name: the whole path tells them apart
    rows, _ = table_rows([_summary("M", "x/data", 0.1), _summary("M", "y/data", 0.2)])
    assert sorted(r["model"] for r in rows) == [
        f"M — {tmp_path / 'x' / 'data'}",
        f"M — {tmp_path / 'y' / 'data'}",
    ]
    write_report(runs, tmp_path / "report")
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| MAEDiff — synthetic-a (2 runs) | 45.00 ± 7.07 |" in md
    assert "| MAEDiff — synthetic-b | 90.00 |" in md


def test_evaluation_and_reporting_import_no_torch():
    # every module of maediff.evaluation and maediff.reporting (what `maediff report`
    # needs), in a fresh process
    code = (
        "import importlib, pkgutil, sys, maediff.evaluation as ev, maediff.reporting as rp\n"
        "names = [m.name for p in (ev, rp) for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]\n"
        "assert {'maediff.reporting.runs', 'maediff.evaluation.protocol'} <= set(names), names\n"
        "for n in names: importlib.import_module(n)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        "'maediff.models', 'maediff.pipeline', 'maediff.training')))\n"
        "assert not bad, bad[:10]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


WRITERS = {"write_text", "write_bytes", "savefig", "savez", "savez_compressed", "dump", "to_csv"}


def test_the_protocol_writes_no_files_and_imports_no_reporting():
    """evaluation/ computes (pure arrays), reporting/ writes: the door goes one way."""
    import ast
    from pathlib import Path

    import maediff.evaluation as ev

    found = []
    for path in sorted(Path(ev.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if "reporting" in node.module or node.module.split(".")[0] in ("csv", "matplotlib"):
                    found.append(f"{path.name} imports {node.module}")
            elif isinstance(node, ast.Import):
                found += [
                    f"{path.name} imports {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] in ("csv", "matplotlib") or "reporting" in a.name
                ]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in WRITERS:
                    found.append(f"{path.name}:{node.lineno} calls {node.func.attr}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open":
                found.append(f"{path.name}:{node.lineno} calls open")
    assert not found, found


@pytest.mark.slow
def test_combined_legends_keep_multi_word_model_names(tmp_path):
    """The combined PR and Dice figures name each series "RUN DATASET"; a model label
    with spaces (Table 2's rows, "pDDPM s48") keeps all its words and its data set."""
    from maediff.reporting.runs import combined_series

    write_layout(tmp_path / "data", n_val=1, n_test=2)
    kw = {"datasets": ("Brats21",), "healthy_test": False}
    thresh = build_model(replace(get_preset("thresh"), data=IdentityModel().cfg.data))
    labels = ["U-Net + Att. + MAE", "pDDPM s48"]
    for i, label in enumerate(labels):
        model = thresh if i == 0 else IdentityModel()
        _evaluate(model, tmp_path / "data", tmp_path / f"eval{i}", label=label, **kw)
    summaries = [load_summary(tmp_path / f"eval{i}") for i in range(2)]
    curves, dice = combined_series(summaries, tmp_path)
    want = {f"{label} BraTS21" for label in labels}  # as shown; the folders keep Brats21
    assert set(curves) == want and set(dice) == want
    assert all(sc is not None and lab is not None for sc, lab in curves.values())
