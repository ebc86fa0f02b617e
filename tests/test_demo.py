"""`maediff demo` end to end at the tiny scale: a step budget, a printed estimate,
both evaluations and the report."""

import json

import pytest

from maediff.pipeline.demo import demo_config, run_demo


def test_demo_budget_is_steps_unless_minutes_are_asked_for():
    cfg = demo_config("cpu")
    assert cfg.train.max_steps > 0 and cfg.train.max_minutes == 0
    assert demo_config("cpu", steps=7).train.max_steps == 7
    timed = demo_config("cpu", minutes=2.5).train
    assert (timed.max_minutes, timed.max_steps) == (2.5, 0)
    assert demo_config("cpu", seed=3).train.seed == 3
    assert demo_config("cpu", overrides=["diffusion.precondition=true"]).diffusion.precondition
    with pytest.raises(ValueError, match="unknown config key"):
        demo_config("cpu", overrides=["train.speed=11"])


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    from conftest import tiny_synth_config

    synth = tiny_synth_config()
    out = tmp_path / "demo"
    timing = run_demo(out, preset="tiny", steps=3, synth=synth, progress=False)
    printed = capsys.readouterr().out
    assert "training tiny for 3 steps" in printed and "report:" in printed
    saved = json.loads((out / "demo_timing.json").read_text())
    assert saved["train_steps"] == 3 == timing["train_steps"]
    assert saved["estimate"]["step_s"] > 0
    stages = [k for k in saved if k.endswith("_s") and k != "total_s"]
    assert saved["total_s"] == pytest.approx(sum(saved[k] for k in stages), abs=0.5)
    assert (out / "report" / "report.html").exists()
    models = [
        json.loads((out / f"eval-{m}" / "summary.json").read_text())["model"]
        for m in ("maediff", "thresh")
    ]
    assert models == ["MAEDiff", "Thresh"]
