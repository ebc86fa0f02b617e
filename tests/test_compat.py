"""Runs written by maediff 0.2.0 (tests/fixtures/v0.2.0) still load, reconstruct to the
same maps and report."""

from pathlib import Path

import numpy as np
import torch

from maediff.evaluation.runs import load_summary, write_report
from maediff.pipeline.detect import reconstruct_volume
from maediff.training.checkpoint import load_model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v0.2.0"


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
    page = write_report([s, load_summary(FIXTURE / "eval")], tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "MAEDiff" in text and page.exists()
    assert not (tmp_path / "lesions.md").exists()  # 0.2.0 had no results by lesion
