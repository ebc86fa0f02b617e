"""`maediff demo` end to end at the tiny scale: a step budget, a printed estimate,
both evaluations and the report."""

import json

import pytest
import torch

from maediff.config import get_preset
from maediff.models import build_model
from maediff.pipeline.demo import DEMO_STEPS, demo_config, precision_line, run_demo


def test_demo_budget_is_steps_unless_minutes_are_asked_for():
    cfg = demo_config("cpu")
    assert cfg.train.max_steps > 0 and cfg.train.max_minutes == 0
    # the model trained here: tiled patches, for the demo's own step budget
    assert cfg.geometry.stride == cfg.geometry.patch_size == 24
    assert cfg.train.max_steps == DEMO_STEPS["cpu"] != get_preset("cpu").train.max_steps
    assert demo_config("cpu", overrides=["geometry.stride=8"]).geometry.stride == 8
    assert demo_config("cpu", tiled=False) == demo_config("cpu", tiled=False, steps=None)
    assert demo_config("cpu", tiled=False).geometry == get_preset("cpu").geometry
    assert build_model(cfg).grid.num_patches == 4  # a quarter of the preset's 16 passes
    assert demo_config("cpu", steps=7).train.max_steps == 7
    timed = demo_config("cpu", minutes=2.5).train
    assert (timed.max_minutes, timed.max_steps) == (2.5, 0)
    assert demo_config("cpu", seed=3).train.seed == 3
    assert demo_config("cpu", overrides=["diffusion.precondition=true"]).diffusion.precondition
    with pytest.raises(ValueError, match="unknown config key"):
        demo_config("cpu", overrides=["train.speed=11"])


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """--model both: a model trained here and a shipped one (here a tiny checkpoint
    standing in for the package's file), both evaluated live beside Thresh."""
    from conftest import tiny_synth_config
    from maediff.weights import save_weights

    synth = tiny_synth_config()
    stand_in = tmp_path / "shipped.safetensors"
    torch.manual_seed(1)
    save_weights(build_model(get_preset("tiny")), stand_in, {"steps": 0})
    out = tmp_path / "demo"
    said = []
    timing = run_demo(
        out,
        preset="tiny",
        steps=3,
        synth=synth,
        progress=False,
        model="both",
        shipped=stand_in,
        say=lambda line, **kw: said.append(line),
    )
    assert capsys.readouterr().out == ""  # the library says through `say`, never print
    printed = "\n".join(said)
    assert "training tiny (patches of 16 px at stride 16) for 3 steps" in printed
    assert "report:" in printed
    assert "precision: fp32 on cpu" in printed or "precision: bf16 autocast on cpu" in printed
    saved = json.loads((out / "demo_timing.json").read_text())
    assert saved["train_steps"] == 3 == timing["train_steps"]
    assert saved["estimate"]["step_s"] > 0
    stages = [k for k in saved if k.endswith("_s") and k != "total_s"]
    assert saved["total_s"] == pytest.approx(sum(saved[k] for k in stages), abs=0.5)
    assert (out / "report" / "report.html").exists()
    models = [
        json.loads((out / f"eval-{m}" / "summary.json").read_text())
        for m in ("shipped", "maediff", "thresh")
    ]
    assert [m["model"] for m in models] == ["MAEDiff (shipped)", "MAEDiff (trained here)", "Thresh"]
    assert models[0]["checkpoint"] == str(stand_in)  # the shipped row is that file's model


def test_demo_refuses_an_unknown_model_choice(tmp_path):
    with pytest.raises(ValueError, match="must be one of shipped, train, both"):
        run_demo(tmp_path / "out", model="pretrained")
    with pytest.raises(ValueError, match="add --model train"):
        run_demo(tmp_path / "out", steps=600)  # a budget means nothing for the shipped model
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_precision_line_says_what_amp_resolved_to():
    cpu = torch.device("cpu")
    assert precision_line("none", cpu) == "precision: fp32 on cpu"
    assert precision_line("bf16", cpu) == "precision: bf16 autocast on cpu"
    auto = precision_line("auto", cpu)
    assert auto.startswith("precision: ") and "amp=auto" in auto


def test_the_shipped_model_loads_reconstructs_and_says_how_to_reproduce_it():
    from maediff.pretrained import checkpoint_path, model_card
    from maediff.weights import load_model

    path = checkpoint_path("maediff-cpu")
    assert path.stat().st_size < 10e6  # the package's limit
    model = load_model(path)
    assert model.cfg.model == "maediff" and model.cfg.geometry.image_size == 48
    x = torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    rec = model.reconstruct(x, torch.Generator().manual_seed(0))
    assert rec.shape == x.shape and torch.isfinite(rec).all()
    card = model_card("maediff-cpu")
    assert "maediff train --preset cpu" in card and "maediff synth" in card
    assert f"{model.checkpoint_info['step']} steps of" in card  # the card says what it holds
    assert model.checkpoint_info["data"].startswith("data/synthetic: IXI fold 0")
    with pytest.raises(KeyError, match="no shipped model"):
        checkpoint_path("nope")


def test_the_shipped_model_card_reproduces_its_configuration_from_this_preset():
    """The card's `maediff train` command, applied to this release's `cpu` preset, gives
    the shipped model's configuration (t_test aside when the card says it was chosen on
    validation): a change of the preset that the card does not follow fails here."""
    import shlex
    from dataclasses import replace

    from maediff.config import apply_overrides, get_preset
    from maediff.pretrained import checkpoint_path, model_card
    from maediff.weights import load_model

    cfg = load_model(checkpoint_path("maediff-cpu")).cfg
    card = model_card("maediff-cpu")
    line = next(x for x in card.splitlines() if x.startswith("maediff train --preset cpu"))
    words = shlex.split(line)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    rebuilt = apply_overrides(get_preset("cpu"), sets)
    if "--choose-t" in card:
        rebuilt = replace(
            rebuilt, diffusion=replace(rebuilt.diffusion, t_test=cfg.diffusion.t_test)
        )
    for name, section in cfg.sections:
        assert getattr(rebuilt, name) == section, name
    assert rebuilt.geometry == cfg.geometry
