"""Runs written by maediff 0.2.0 (tests/fixtures/v0.2.0) and 0.4.0 (a one-pass DAE run,
tests/fixtures/v0.4.0/dae-run) still load, reconstruct to the same maps and report."""

import shutil
from pathlib import Path

import numpy as np
import torch

from maediff.pipeline.detect import reconstruct_volume
from maediff.reporting.runs import load_summary, write_report
from maediff.weights import load_model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v0.2.0"
V040 = FIXTURE.parent / "v0.4.0"


def test_a_0_2_0_checkpoint_reconstructs_the_same_maps():
    model = load_model(FIXTURE / "run", torch.device("cpu"))
    assert model.cfg.model == "maediff" and model.cfg.unet.model_channels == 8
    # options added since 0.2.0 take the values that reproduce 0.2.0
    assert model.cfg.mae.tokens == "features" and not model.cfg.mae.token_norm
    assert model.cfg.inference.patch_selection == "all"
    with np.load(FIXTURE / "maps.npz") as z:
        image, want = z["image"], z["reconstruction"]
    got = reconstruct_volume(model, image, torch.Generator().manual_seed(0))
    assert np.abs(got - want).max() < 1e-5


def test_a_0_2_0_evaluation_reads_and_reports(tmp_path):
    s = load_summary(FIXTURE / "eval")
    assert s.model == "MAEDiff" and s.datasets["Brats21"].lesions is None
    # a second run of the same format (another folder: one folder twice is refused)
    shutil.copytree(FIXTURE / "eval", tmp_path / "again")
    page = write_report([s, load_summary(tmp_path / "again")], tmp_path / "report")
    text = (tmp_path / "report" / "results.md").read_text()
    assert "MAEDiff" in text and page.exists()
    assert not (tmp_path / "report" / "lesions.md").exists()  # 0.2.0 had no results by lesion


def test_a_0_4_0_one_pass_run_reconstructs_its_own_maps():
    """Before 0.5.0 the one-pass models clamped their reconstructions to [0, 1]; a run of
    then keeps that rule (its saved configuration has no inference.clamp), unless asked."""
    with np.load(V040 / "dae-maps.npz") as z:
        image, want = z["image"], z["reconstruction"]
    model = load_model(V040 / "dae-run", torch.device("cpu"))
    assert model.cfg.model == "dae" and model.cfg.inference.clamp
    got = reconstruct_volume(model, image, torch.Generator().manual_seed(0))
    assert np.abs(got - want).max() < 1e-5
    new_rule = load_model(V040 / "dae-run", torch.device("cpu"), ["inference.clamp=false"])
    raw = reconstruct_volume(new_rule, image, torch.Generator().manual_seed(0))
    assert np.abs(raw - want).max() > 0.1  # the fixture tells the two rules apart
    # the run's config.yaml (what --resume reads) follows the same rule; MAEDiff never clamped
    from maediff.training.trainer import load_run_config

    assert load_run_config(V040 / "dae-run").inference.clamp
    assert not load_model(FIXTURE / "run", torch.device("cpu")).cfg.inference.clamp
