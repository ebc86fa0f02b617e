"""benchmarks/learning_curve.py end to end at the tiny scale: train, evaluate by the
protocol, resume, table and figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_curve.py"


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def plt_width(png: Path) -> int:
    import matplotlib.image

    return matplotlib.image.imread(png).shape[1]


@pytest.mark.slow  # end to end: trains and runs whole commands
def test_learning_curve_runs_resumes_and_draws(tiny_bench, tmp_path):
    out = tmp_path / "curve"
    common = ["--data", str(tiny_bench), "--out", str(out), "--scale", "tiny"]
    jobs = _run(*common, "--rows", "MAEDiff", "--budgets", "2", "--seeds", "1", "--list")
    assert jobs.split() == ["MAEDiff", "2", "steps", "seed", "0"]
    _run(*common, "--rows", "MAEDiff", "--budgets", "2", "--seeds", "1")
    result = out / "maediff" / "2" / "seed0" / "result.json"
    row = json.loads(result.read_text())
    assert row["steps"] == 2 and row["preset"] == "maediff-tiny"
    # the metrics are evaluate's, read back from its summary
    summary = json.loads((out / "maediff/2/seed0/eval/summary.json").read_text())
    dice = summary["datasets"]["Brats21"]["metrics"]["dice"]["mean"]
    assert abs(row["metrics"]["tumour_dice"] - 100 * dice) < 1e-9
    assert 0 <= row["metrics"]["healthy_l1"] < 1e3
    # a finished job is not redone
    mtime = result.stat().st_mtime_ns
    _run(*common, "--rows", "MAEDiff", "--budgets", "2", "--seeds", "1")
    assert result.stat().st_mtime_ns == mtime
    table = _run(*common, "--collect", "--figure", str(tmp_path / "img"))
    assert "| MAEDiff | 2 | 1 |" in table
    for name in ("learning_curve.png", "learning_curve_reconstructions.png"):
        assert (tmp_path / "img" / name).stat().st_size > 1000
    assert not (tmp_path / "img" / "learning_curve_96px.png").exists()  # no 96 px row yet
    # recorded points join the table and the figure where the folder has fewer seeds;
    # a model given for a budget without a run adds a column to the reconstructions
    recorded = tmp_path / "recorded.csv"
    header = (
        "row,steps,seeds,tumour_dice,tumour_dice_sd,tumour_auprc,tumour_auprc_sd,ms_dice,"
        "ms_dice_sd,ms_auprc,ms_auprc_sd,healthy_l1,healthy_l1_sd,train_min,cpu,amp,release\n"
    )
    recorded.write_text(
        header
        + "MAEDiff,2,1,99.0,,1,,1,,1,,1,,1.0,some CPU,none,0.0\n"  # the folder's own: kept
        + "MAEDiff,30,2,41.5,0.5,40,1,2,0.1,1,0.1,80,2,3.0,some CPU,none,0.0\n"
        + "AE,30,1,20.25,,20,,2,,1,,50,,0.5,some CPU,none,0.0\n"
    )
    before = plt_width(tmp_path / "img" / "learning_curve_reconstructions.png")
    table = _run(*common, "--collect", "--figure", str(tmp_path / "img"), "--recorded",
                 str(recorded), "--model-at", f"30={out / 'maediff/2/seed0/run'}")  # fmt: skip
    lines = table.splitlines()
    assert any(ln.startswith("| MAEDiff | 2 | 1 |") and "99.00" not in ln for ln in lines)
    assert "| MAEDiff | 30 | 2 | 41.50 ± 0.50 |" in table and "| AE | 30 | 1 | 20.25 |" in table
    assert plt_width(tmp_path / "img" / "learning_curve_reconstructions.png") > before
    recorded.write_text(header + "MAEDiff,x,1,1,,1,,1,,1,,1,,1.0,c,none,0.0\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), *common, "--collect", "--recorded",
                          str(recorded)], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "recorded.csv, line 2" in bad.stderr
    # the resolution figure, once the 96 px row has run at a budget MAEDiff has too (here
    # the same tiny run stands in for it: the figure's loading, choice of slice and drawing)
    import shutil

    twin = out / "maediff-96-px" / "2" / "seed0"
    shutil.copytree(result.parent, twin)
    moved = json.loads((twin / "result.json").read_text())
    (twin / "result.json").write_text(json.dumps({**moved, "row": "MAEDiff 96 px"}))
    table = _run(*common, "--collect", "--figure", str(tmp_path / "img"))
    assert "| MAEDiff 96 px | 2 | 1 |" in table and "| MAEDiff | 2 | 1 |" in table
    assert (tmp_path / "img" / "learning_curve_96px.png").stat().st_size > 1000
    shutil.rmtree(twin.parent.parent)
    # a job killed before its first checkpoint (its folder holds a config and no
    # weights) starts again instead of stopping the curve on "cannot resume"
    killed = out / "maediff" / "3" / "seed0"
    (killed / "run").mkdir(parents=True)
    (killed / "run" / "config.yaml").write_text((result.parent / "run" / "config.yaml").read_text())
    _run(*common, "--rows", "MAEDiff", "--budgets", "3", "--seeds", "1")
    assert json.loads((killed / "result.json").read_text())["steps"] == 3


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_the_96_px_row_trains_at_the_datas_resolution_and_amp_reaches_both_commands(tmp_path):
    lc = _script()
    assert ("MAEDiff 96 px", 1000, 0) in lc.jobs()
    cmd = lc.train_command(tmp_path, tmp_path / "run", "MAEDiff 96 px", 1000, 0, "cpu", "none")
    settings = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    for s in ("geometry.image_size=96", "geometry.patch_size=48", "geometry.stride=16",
              "geometry.grid_size=16", "train.amp=none", "train.max_steps=1000"):  # fmt: skip
        assert s in settings, (s, settings)
    assert cmd[cmd.index("--preset") + 1] == "maediff-cpu"
    # the 96 px settings make a valid configuration of the cpu preset
    from maediff.config import apply_overrides, get_preset

    cfg = apply_overrides(get_preset("cpu"), [s for s in settings if s.startswith("geometry")])
    assert cfg.geometry.image_size == 96 and cfg.geometry.patch_size == 48
    # the 48 px rows keep the preset as it is, and the recorded autocast is the one used
    plain = lc.train_command(tmp_path, tmp_path / "run", "MAEDiff", 300, 0)
    assert not any(a.startswith(("geometry.", "train.amp")) for a in plain)
    assert lc.used_amp("none") == "none"
    assert lc.used_amp(None) in ("none", "bf16")
