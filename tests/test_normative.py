"""Normative scoring (evaluation/normative.py): per-band healthy residual statistics,
checked by hand, and what they do to a map whose bright healthy tissue out-scores a
lesion."""

import numpy as np
import pytest

from maediff.evaluation.normative import BandNormaliser
from maediff.evaluation.protocol import EvalSettings, VolumeResult, evaluate_split


def _phantom(rng, lesion: bool):
    """A 24x24x8 volume: white matter (0.3) with a bright CSF block (0.8), whose
    reconstruction leaves 0.20 +- 0.02 in CSF, 0.03 +- 0.01 in WM and, with a
    lesion, 0.12 in it."""
    image = np.full((24, 24, 8), 0.3, np.float32)
    image[2:10, 2:22, :] = 0.8
    brain = np.ones_like(image, bool)
    err = np.where(
        image > 0.5, rng.normal(0.2, 0.02, image.shape), rng.normal(0.03, 0.01, image.shape)
    )
    seg = np.zeros_like(image, np.uint8)
    if lesion:
        seg[12:20, 8:16, 2:6] = 1
        err[seg > 0] = 0.12
    rec = (image - np.abs(err)).astype(np.float32)
    return image, rec, brain, seg


def test_fit_gives_each_bands_mean_and_spread_by_hand():
    rng = np.random.default_rng(0)
    image, rec, brain, _ = _phantom(rng, lesion=False)
    norm = BandNormaliser.fit([(image, rec, brain)], bands=2)
    from maediff.evaluation.postprocess import erode_mask_slicewise

    inside = erode_mask_slicewise(brain)
    x, r = image[inside].astype(float), np.abs(image - rec)[inside].astype(float)
    for b, sel in enumerate((x < 0.5, x > 0.5)):  # the two intensities are the two bands
        assert norm.mean[b] == pytest.approx(r[sel].mean(), rel=1e-6)
        assert norm.sd[b] == pytest.approx(r[sel].std(), rel=1e-6)
    z = norm.apply(np.array([[[0.2, 0.5]]]), np.array([[[0.3, 0.8]]]))
    expected = [max(0.2 - norm.mean[0], 0) / norm.sd[0], max(0.5 - norm.mean[1], 0) / norm.sd[1]]
    np.testing.assert_allclose(z.ravel(), expected, rtol=1e-5)
    assert BandNormaliser.from_json(norm.to_json()).to_json() == norm.to_json()


def test_fit_refuses_too_few_voxels_and_bad_records():
    tiny = np.zeros((3, 3, 1), np.float32)
    with pytest.raises(ValueError, match="needs healthy brain voxels"):
        BandNormaliser.fit([(tiny, tiny, np.ones_like(tiny, bool))])
    with pytest.raises(ValueError, match="incomplete"):
        BandNormaliser.from_json({"edges": [0, 1]})
    with pytest.raises(ValueError, match="spreads positive"):
        BandNormaliser(np.array([0.0, 1.0]), np.array([0.1]), np.array([0.0]))


def test_normative_scoring_finds_the_lesion_that_bright_tissue_hides():
    rng = np.random.default_rng(1)
    healthy = [_phantom(rng, lesion=False)[:3] for _ in range(2)]
    norm = BandNormaliser.fit(healthy, bands=4)

    def volumes(n, seed):
        r = np.random.default_rng(seed)
        for i in range(n):
            image, rec, brain, seg = _phantom(r, lesion=True)
            yield VolumeResult(f"v{i}", image, rec, brain, seg, np.eye(4), [])

    plain = evaluate_split(volumes(2, 2), volumes(2, 3), EvalSettings(median_size=1))
    normative = evaluate_split(
        volumes(2, 2), volumes(2, 3), EvalSettings(median_size=1, normaliser=norm)
    )
    dice = lambda o: np.mean([r["dice"] for r in o.records])  # noqa: E731
    assert dice(plain) < 0.6 < 0.95 < dice(normative)


def test_settings_in_the_summary_leave_the_normaliser_to_scoring():
    from maediff.reporting.summary import EvaluationSummary, Scoring

    rng = np.random.default_rng(0)
    norm = BandNormaliser.fit([_phantom(rng, lesion=False)[:3]], bands=2)
    s = EvaluationSummary(
        model="m",
        datasets={},
        settings=EvalSettings(normaliser=norm),
        scoring=Scoring(normative=norm.to_json()),
    )
    out = s.to_json()
    assert "normaliser" not in out["settings"]
    assert out["scoring"]["normative"]["mean"] == norm.to_json()["mean"]
    back = EvaluationSummary.from_json(out)
    assert back.to_json() == out


@pytest.mark.slow
def test_evaluate_with_normative_scoring_records_its_normaliser(tiny_bench, tmp_path, gen):
    from conftest import draw_zero_layers
    from maediff.config import get_preset
    from maediff.models import build_model
    from maediff.pipeline.evaluate import evaluate_model

    model = draw_zero_layers(build_model(get_preset("maediff-tiny")), gen).eval()
    s = evaluate_model(
        model,
        tiny_bench,
        tmp_path / "e",
        scoring="normative",
        healthy_test=False,
        progress=False,
        figures=False,
        workers=0,
    )
    rec = s.scoring.normative
    assert rec["volumes"] >= 1 and len(rec["mean"]) == 16 and rec["sources"]
    with pytest.raises(ValueError, match="must be 'residual' or 'normative'"):
        evaluate_model(model, tiny_bench, tmp_path / "x", scoring="zscore")
