"""End to end through the command line on a tiny config in a temporary folder."""

import json

import nibabel as nib
import numpy as np
import pytest

from maediff.cli import main


def _train(bench, run, seed=0):
    return main(
        [
            "train",
            "--data",
            str(bench),
            "--run",
            str(run),
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "-q",
            "--set",
            "train.epochs=3",
            "--set",
            "train.batch_size=4",
            "--set",
            f"train.seed={seed}",
        ]
    )


@pytest.mark.slow
def test_cli_end_to_end_is_deterministic(tiny_bench, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_bench, run) == 0
    assert (run / "best.safetensors").exists() and (run / "config.yaml").exists()
    # the same command again refuses to overwrite a run without --overwrite
    assert _train(tiny_bench, run) == 2
    assert "already holds a training run" in capsys.readouterr().err

    scans = tiny_bench / "Test" / "Brats21" / "t2"
    out = tmp_path / "maps"
    detect = [
        "detect",
        "-i",
        str(scans),
        "-o",
        str(out),
        "--model",
        str(run),
        "--device",
        "cpu",
        "-q",
        "--threshold",
        "0.2",
    ]
    assert main(detect) == 0
    first = sorted(scans.iterdir())[0]
    name = first.name.replace(".nii.gz", "")
    src = nib.load(str(first))
    for kind in ("anomaly", "score", "reconstruction", "prediction"):
        img = nib.load(str(out / f"{name}_{kind}.nii.gz"))
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine)
    # existing outputs are skipped unless --overwrite
    assert main(detect) == 0
    assert "0 written, 3 skipped" in capsys.readouterr().out

    def evaluate(out):
        return main(
            [
                "evaluate",
                "--model",
                str(run),
                "--data",
                str(tiny_bench),
                "-o",
                str(out),
                "--device",
                "cpu",
                "-q",
            ]
        )

    ev = tmp_path / "eval"
    assert evaluate(ev) == 0
    s1 = json.loads((ev / "summary.json").read_text())
    assert set(s1["datasets"]) == {"Brats21", "MSLUB", "IXI"}
    assert (ev / "report.html").exists() and (ev / "examples_Brats21.png").exists()
    assert evaluate(tmp_path / "eval2") == 0
    s2 = json.loads((tmp_path / "eval2" / "summary.json").read_text())
    assert s1["datasets"]["Brats21"]["metrics"] == s2["datasets"]["Brats21"]["metrics"]
    assert s1["datasets"]["Brats21"]["threshold"] == s2["datasets"]["Brats21"]["threshold"]

    th = tmp_path / "thresh"
    assert (
        main(
            [
                "evaluate",
                "--baseline",
                "thresh",
                "--data",
                str(tiny_bench),
                "-o",
                str(th),
                "--preset",
                "tiny",
                "-q",
            ]
        )
        == 0
    )
    rep = tmp_path / "report"
    assert main(["report", str(ev), str(th), "-o", str(rep)]) == 0
    md = (rep / "results.md").read_text()
    assert "| MAEDiff |" in md and "| Thresh |" in md
    assert "src='2-Thresh_examples_Brats21.png'" in (rep / "report.html").read_text()


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tiny_bench, tmp_path):
    from maediff.weights import read_checkpoint

    assert _train(tiny_bench, tmp_path / "a", seed=5) == 0
    assert _train(tiny_bench, tmp_path / "b", seed=5) == 0
    wa, wb = (
        read_checkpoint(tmp_path / "a" / "last.safetensors")[1],
        read_checkpoint(tmp_path / "b" / "last.safetensors")[1],
    )
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


@pytest.mark.slow
def test_detect_continues_past_a_bad_file_and_exits_nonzero(tiny_bench, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_bench, run) == 0
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((tiny_bench / "Test" / "MSLUB" / "t2").iterdir())[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / "broken.nii.gz").write_bytes(good.read_bytes()[:500])
    code = main(
        [
            "detect",
            "-i",
            str(folder),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(run),
            "--device",
            "cpu",
            "-q",
        ]
    )
    err = capsys.readouterr()
    assert code == 1
    assert "1 written" in err.out and "1 failed" in err.out
    assert "broken.nii.gz" in err.err and "truncated" in err.err
    assert not list((tmp_path / "out").glob("broken*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["detect", "-i", "/nonexistent.nii.gz", "-o", "/tmp/x", "--model", "/nonexistent"],
            "does not exist",
        ),
        (
            ["train", "--run", "/tmp/x-run", "--preset", "tiny", "--set", "train.lr=-1"],
            "train.lr=-1",
        ),
        (["evaluate", "--data", "/tmp", "-o", "/tmp/x"], "--model"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # options that cannot go together: argparse's exit, with usage
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def _subcommands() -> list[str]:
    import argparse

    from maediff.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def test_every_subcommand_has_help_and_is_documented(capsys):
    """Read from the parser itself: a new subcommand is checked without editing a list."""
    from pathlib import Path

    cmds = _subcommands()
    assert {"train", "detect", "evaluate", "report", "benchmark", "preprocess", "demo"} <= set(cmds)
    root = Path(__file__).resolve().parents[1]
    docs = "\n".join(p.read_text() for p in [root / "README.md", *(root / "docs").glob("*.md")])
    for cmd in cmds:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: maediff " + cmd in capsys.readouterr().out
        assert f"maediff {cmd}" in docs, f"`maediff {cmd}` is in no README or docs page"


def test_bids_output_names():
    from maediff.pipeline.detect import output_paths

    p = output_paths("out", "sub-01_ses-1_T2w", bids=True)
    assert p["anomaly"].name == "sub-01_ses-1_desc-anomalymap_T2w.nii.gz"
    assert p["prediction"].name == "sub-01_ses-1_desc-anomalymask_T2w.nii.gz"
    assert output_paths("out", "scan")["score"].name == "scan_score.nii.gz"


@pytest.mark.slow
def test_evaluate_refuses_training_overrides_on_a_trained_model(tiny_bench, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_bench, run) == 0
    argv = [
        "evaluate",
        "--model",
        str(run),
        "--data",
        str(tiny_bench),
        "-o",
        str(tmp_path / "e"),
        "--set",
        "unet.model_channels=8",
        "-q",
    ]
    assert main(argv) == 2
    assert (
        "only inference.*, data.standardise, diffusion.t_test, diffusion.sample_steps can be"
        in capsys.readouterr().err
    )
