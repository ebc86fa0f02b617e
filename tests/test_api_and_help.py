"""The documented Python of the common case runs (docs/labelfree.md §From Python), each
subcommand's help ends with examples that parse, and what the help and docs say of
the synthetic benchmark's default sizes is what the command does."""

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maediff.cli import EXAMPLES, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def python_block(doc: str, needle: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)
    (block,) = [b for b in blocks if needle in b]
    return block


@pytest.mark.slow
def test_the_documented_python_maps_one_scan(tiny_bench, tmp_path, monkeypatch, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    src = sorted((tiny_bench / "Test" / "Brats21" / "t2").glob("*.nii.gz"))[0]
    mask = src.parents[1] / "mask" / src.name.replace("_t2", "_mask")
    shutil.copy(src, scans / "sub-05_T2w.nii.gz")
    shutil.copy(mask, scans / "sub-05_T2w_mask.nii.gz")
    monkeypatch.chdir(tmp_path)
    exec(python_block("docs/labelfree.md", "map_scan"), {})
    score, brain, *qc = capsys.readouterr().out.split()
    assert float(score) > 0 and float(brain) > 500 and qc == ["no", "flag"]
    out = nib.load("maps-python/sub-05_T2w_score.nii.gz")
    scan = nib.load(scans / "sub-05_T2w.nii.gz")
    assert out.shape == scan.shape and np.allclose(out.affine, scan.affine)
    assert sorted(p.name for p in Path("maps-python").iterdir()) == [
        "sub-05_T2w_anomaly.nii.gz",
        "sub-05_T2w_reconstruction.nii.gz",
        "sub-05_T2w_score.nii.gz",
    ]


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_each_subcommand_help_ends_with_examples_that_parse(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out.rstrip()
    tail = text.split("examples:\n")[-1].splitlines()
    assert tail and all(line.startswith("  maediff ") for line in tail), text[-300:]
    for line in tail:
        args = build_parser().parse_args(line.split()[1:])
        assert args.command == command


def test_every_subcommand_has_examples():
    import argparse

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(EXAMPLES)


def test_the_help_says_what_demo_and_evaluate_do(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "evaluate the shipped model" in text and "train the cpu preset" not in text
    assert "pDDPM's layout or a BIDS data set" in text


def test_the_synthetic_default_sizes_in_docs_are_the_commands():
    from maediff.data.synthetic import SynthConfig

    c = SynthConfig()
    text = " ".join((ROOT / "docs" / "data.md").read_text().split())
    said = (
        f"{c.healthy_trainval} healthy train+val volumes (5 folds of 96 / 24), "
        f"{c.healthy_test} healthy test, tumour {c.tumour_val} val / {c.tumour_test} test, "
        f"MS {c.ms_val} val / {c.ms_test} test"
    )
    assert said in text
    args = build_parser().parse_args(["synth", "-o", "x"])
    assert (args.healthy, args.healthy_test, args.tumour_test, args.ms_test) == (
        c.healthy_trainval,
        c.healthy_test,
        c.tumour_test,
        c.ms_test,
    )
