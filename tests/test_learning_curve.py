"""benchmarks/learning_curve.py end to end at the tiny scale: train, evaluate by the
protocol, resume, table and figures."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_curve.py"


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


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
    # a job killed before its first checkpoint (its folder holds a config and no
    # weights) starts again instead of stopping the curve on "cannot resume"
    killed = out / "maediff" / "3" / "seed0"
    (killed / "run").mkdir(parents=True)
    (killed / "run" / "config.yaml").write_text((result.parent / "run" / "config.yaml").read_text())
    _run(*common, "--rows", "MAEDiff", "--budgets", "3", "--seeds", "1")
    assert json.loads((killed / "result.json").read_text())["steps"] == 3
