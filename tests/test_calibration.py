"""Thresholds set on healthy scans (evaluation/calibration.py) and the one-file model
(training/export.py): the quantile and its bootstrap, what a threshold leaves after
small components, and the refusals that keep a calibration with its model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from maediff.config import apply_overrides, get_preset
from maediff.evaluation.calibration import (
    Calibration,
    HealthyScan,
    bootstrap_thresholds,
    calibrate,
    tail_histograms,
    weighted_tail_quantile,
    what_remains,
)
from maediff.models import build_model
from maediff.pipeline.thresholds import check_calibration
from maediff.training.export import export_model, read_card
from maediff.weights import CheckpointError, load_model, save_weights

POST = {"erosion_iterations": 3, "median_size": 5, "min_component": 7}


def _scans(n, seed=0, shape=(12, 12, 6)):
    rng = np.random.default_rng(seed)
    mask = np.ones(shape, bool)
    return [
        HealthyScan(f"s{i}", rng.gamma(2.0, 0.05 * (1 + 0.3 * i), shape).astype(np.float32), mask)
        for i in range(n)
    ]


def test_tail_histogram_quantile_matches_the_pooled_quantile():
    per_scan = [s.scores.ravel() for s in _scans(5)]
    pooled = np.concatenate(per_scan)
    edges, counts, below = tail_histograms(per_scan, 0.8)
    assert counts.sum() + below.sum() == pooled.size
    for f in (0.01, 0.05):
        got = weighted_tail_quantile(edges, counts.sum(0), pooled.size, f)
        assert got == pytest.approx(np.quantile(pooled, 1 - f), rel=2e-3)


def test_bootstrap_resamples_scans_not_voxels():
    # two kinds of scan: a resample's threshold moves with how many of each it draws
    low = [np.full(1000, 0.1, np.float32) + np.linspace(0, 0.01, 1000, dtype=np.float32)] * 3
    high = [np.full(1000, 0.5, np.float32) + np.linspace(0, 0.01, 1000, dtype=np.float32)] * 3
    boot = bootstrap_thresholds([*low, *high], [0.3], n_boot=400, seed=1)[0.3]
    assert boot.min() < 0.2 and boot.max() > 0.5  # some resamples have no high scans
    same = bootstrap_thresholds([low[0]] * 6, [0.3], n_boot=50)[0.3]
    assert np.ptp(same) == pytest.approx(0.0, abs=1e-6)  # identical scans: no spread


def test_calibrate_thresholds_intervals_and_warning():
    scans = _scans(4)
    cal = calibrate(scans, [0.05, 0.01], {"name": "m"}, {}, POST, n_boot=200)
    pooled = np.concatenate([s.scores.ravel() for s in scans])
    assert [t.fpr for t in cal.thresholds] == [0.01, 0.05]
    for t in cal.thresholds:
        assert t.threshold == pytest.approx(np.quantile(pooled, 1 - t.fpr))
        assert t.ci_low <= t.threshold <= t.ci_high
    assert cal.n_scans == 4 and cal.n_voxels == pooled.size and "below 20" in cal.warnings[0]
    assert not calibrate(_scans(20), [0.05], {}, {}, POST, n_boot=20).warnings
    back = Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    assert back == cal and back.threshold(0.01) == cal.thresholds[0].threshold
    with pytest.raises(ValueError, match="no threshold at FPR 0.1"):
        cal.threshold(0.1)
    with pytest.raises(ValueError, match="must be in"):
        calibrate(scans, [1.5], {}, {}, POST)


def test_what_remains_counts_voxels_and_scans_after_small_components():
    mask = np.ones((10, 10, 10), bool)
    a = np.zeros((10, 10, 10), np.float32)
    a[1:3, 1:3, 1:3] = 1.0  # 8 voxels: kept (> 7)
    a[7, 7, 7] = 1.0  # 1 voxel: removed
    b = np.zeros_like(a)
    b[5, 5, 5] = 1.0  # removed: no component left
    rate, flagged = what_remains([HealthyScan("a", a, mask), HealthyScan("b", b, mask)], 0.5, 7)
    assert rate == pytest.approx(8 / 2000) and flagged == 1


def test_control_percentile():
    cal = calibrate(_scans(4), [0.05], {}, {}, POST, n_boot=10)
    ordered = sorted(cal.scan_scores)
    assert cal.control_percentile(ordered[0] - 1) == 0
    assert cal.control_percentile(ordered[2] + 1e-9) == 75
    assert cal.control_percentile(ordered[-1] + 1) == 100


def _saved(tmp_path, name="run"):
    cfg = apply_overrides(get_preset("ae-tiny"), [])
    torch.manual_seed(0)
    run = tmp_path / name
    save_weights(build_model(cfg), run / "best.safetensors", {"data": "4 healthy scans", "step": 3})
    return run


def _cal_for(model, **scoring):
    from maediff.weights import model_identity, scoring_settings

    return calibrate(
        _scans(2),
        [0.01],
        model_identity(model),
        {**scoring_settings(model.cfg), **scoring},
        POST,
        n_boot=10,
    )


def test_export_round_trip_identity_and_card(tmp_path):
    run = _saved(tmp_path)
    model = load_model(run)
    cal = _cal_for(model)
    out = export_model(run, tmp_path / "model.safetensors", cal)
    shared = load_model(out)
    assert shared.checkpoint_info["identity"] == model.checkpoint_info["identity"]
    for k, v in load_file(run / "best.safetensors").items():
        assert torch.equal(load_file(out)[k], v)
    check_calibration(cal, shared)  # the run's calibration holds for the file
    card = read_card(out)
    assert "4 healthy scans" in card and "FPR 0.01" in card and "Not for clinical use" in card
    with pytest.raises(ValueError, match="exists"):
        export_model(run, out, cal)


def test_calibrations_of_other_models_or_settings_are_refused(tmp_path):
    model = load_model(_saved(tmp_path, "a"))
    cal = _cal_for(model)
    torch.manual_seed(1)
    other_cfg = get_preset("ae-tiny")
    save_weights(build_model(other_cfg), tmp_path / "b" / "best.safetensors")
    other = load_model(tmp_path / "b")
    with pytest.raises(ValueError, match="another model"):
        check_calibration(cal, other)
    with pytest.raises(ValueError, match="another model"):
        export_model(tmp_path / "b", tmp_path / "b.safetensors", cal)
    with pytest.raises(ValueError, match="inference.clamp"):
        check_calibration(cal, load_model(tmp_path / "a", overrides=["inference.clamp=true"]))
    check_calibration(cal, load_model(tmp_path / "a", overrides=["inference.batch_size=3"]))


def test_a_file_of_another_format_version_is_refused(tmp_path):
    run = _saved(tmp_path)
    src = run / "best.safetensors"
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(format="maediff-checkpoint-v2", maediff_version="9.0.0")
    save_file(load_file(src), str(tmp_path / "new.safetensors"), metadata=meta)
    with pytest.raises(
        CheckpointError, match=r"maediff 9\.0\.0 in format version 2.*reads version 1"
    ):
        load_model(tmp_path / "new.safetensors")
