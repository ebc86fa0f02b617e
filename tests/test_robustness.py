"""Beyond the paper: noise-ensembled scoring, intensity augmentation, histogram
standardisation and the second synthetic site."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import draw_zero_layers
from maediff.config import NYUL_PERCENTILES, AugmentConfig, get_preset
from maediff.data.augment import augment_intensity, gaussian_blur, random_curve
from maediff.data.io import DataError
from maediff.data.load import learn_landmarks, nyul_landmarks, nyul_standardise
from maediff.models.maediff import MAEDiff


def _model(cfg, gen) -> MAEDiff:
    torch.manual_seed(0)
    return draw_zero_layers(MAEDiff(cfg).eval(), gen)


# ------------------------------------------------------------------ noise ensembles


def test_single_member_ensemble_is_the_plain_reconstruction(gen):
    cfg = get_preset("tiny")
    model = _model(cfg, gen)
    x = torch.rand(2, 1, 32, 32, generator=gen)
    plain = model.reconstruct(x, torch.Generator().manual_seed(3))
    model.cfg = replace(cfg, inference=replace(cfg.inference, ensemble_t=(cfg.diffusion.t_test,)))
    torch.testing.assert_close(model.reconstruct(x, torch.Generator().manual_seed(3)), plain)


def test_ensemble_map_is_the_mean_of_the_members_maps(gen):
    cfg = get_preset("tiny")
    ts = (250, 750)
    ens_cfg = replace(cfg, inference=replace(cfg.inference, ensemble_t=ts, ensemble_draws=2))
    model = _model(ens_cfg, gen)
    S = 1
    x = torch.rand(S, 1, 32, 32, generator=gen)
    noise = torch.randn(len(ts) * 2 * S, 1, 32, 32, generator=gen)
    out = model.reconstruct(x, noise=noise)
    recs = []
    for m, t in enumerate(t for t in ts for _ in range(2)):
        model.cfg = replace(cfg, diffusion=replace(cfg.diffusion, t_test=t))
        recs.append(model.reconstruct(x, noise=noise[m * S : (m + 1) * S]))
    recs = torch.stack(recs)  # (E, S, 1, H, W)
    torch.testing.assert_close((x - out).abs(), (x - recs).abs().mean(0), atol=1e-5, rtol=0)
    # where every member errs on the same side, the result is the mean reconstruction
    agree = ((x - recs) > 0).all(0) | ((x - recs) < 0).all(0)
    assert agree.float().mean() > 0.3
    torch.testing.assert_close(out[agree], recs.mean(0)[agree], atol=1e-5, rtol=0)


def test_ensemble_with_brain_mask_keeps_the_input_outside(gen):
    cfg = get_preset("tiny")
    cfg = replace(cfg, inference=replace(cfg.inference, ensemble_t=(300, 600)))
    model = _model(cfg, gen)
    x = torch.rand(1, 1, 32, 32, generator=gen)
    brain = torch.zeros_like(x)
    brain[..., :8, :8] = 1  # only the top-left patch(es) hold brain
    out = model.reconstruct(x, torch.Generator().manual_seed(0), brain_mask=brain)
    far = torch.zeros_like(x, dtype=torch.bool)
    far[..., 24:, 24:] = True
    assert torch.equal(out[far], x[far])
    assert not torch.equal(out[..., :8, :8], x[..., :8, :8])


def test_ensemble_options_are_checked():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="ensemble_draws"):
        replace(cfg.inference, ensemble_draws=0)
    with pytest.raises(ValueError, match="is an option of model maediff"):
        replace(get_preset("dae-tiny"), inference=replace(cfg.inference, ensemble_t=(250,)))
    # a timestep beyond the schedule is refused with the configuration, before any scan
    with pytest.raises(ValueError, match=r"ensemble_t=\[2000\] must hold timesteps in 1\.\.1000"):
        replace(cfg, inference=replace(cfg.inference, ensemble_t=(2000,)))
    with pytest.raises(ValueError, match="2 ensemble member"):
        m2 = MAEDiff(replace(cfg, inference=replace(cfg.inference, ensemble_draws=2)))
        m2.reconstruct(torch.rand(1, 1, 32, 32), noise=torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------ augmentation


def test_random_curve_is_monotone_and_keeps_the_ends(gen):
    x = torch.linspace(0, 1, 101).view(1, 1, 1, 101).repeat(4, 1, 1, 1)
    y = random_curve(x, 0.5, gen)
    assert torch.all(y[..., 1:] >= y[..., :-1])
    torch.testing.assert_close(y[..., 0], torch.zeros(4, 1, 1))
    torch.testing.assert_close(y[..., -1], torch.ones(4, 1, 1))
    assert not torch.allclose(y, x, atol=0.02)  # it does change the contrast


def test_gaussian_blur_by_hand():
    x = torch.zeros(2, 1, 9, 9)
    x[:, :, 4, 4] = 1
    out = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)  # sigma 0: identity
    g = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    g /= g.sum()
    torch.testing.assert_close(
        out[1, 0, 1:8, 4].double(), torch.from_numpy(g * g[3]), atol=1e-6, rtol=0
    )


def test_augmentation_stays_in_the_brain_and_in_range(gen):
    x = torch.rand(8, 1, 32, 32, generator=gen)
    x[..., :4] = 0  # background
    cfg = AugmentConfig(enabled=True, probability=1.0)
    out = augment_intensity(x, cfg, gen)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.all(out[..., :4] == 0)
    assert (out - x).abs().mean() > 0.02
    off = augment_intensity(x, replace(cfg, probability=0.0), gen)
    torch.testing.assert_close(off, x)
    a = augment_intensity(x, cfg, torch.Generator().manual_seed(5))
    b = augment_intensity(x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="augment.gamma"):
        AugmentConfig(gamma=(1.5, 0.7))


@pytest.mark.slow
def test_training_step_sees_augmented_slices(tiny_bench, tmp_path, monkeypatch):
    """A real training run feeds the model augmented slices when augment.enabled, and
    the raw ones otherwise (the same seed, so the same slices are drawn)."""
    from maediff.models.dae import DAE
    from maediff.training.data import prepare_training_data
    from maediff.training.trainer import train

    seen: dict[bool, list] = {True: [], False: []}
    real = DAE.loss

    def recording(self, x0, *a, **kw):
        seen[self.cfg.augment.enabled].append(x0.detach().clone())
        return real(self, x0, *a, **kw)

    monkeypatch.setattr(DAE, "loss", recording)
    # the memory estimate's one forward on a made-up sample would be recorded first
    monkeypatch.setenv("MAEDIFF_NO_MEMORY_CHECK", "1")
    for enabled in (False, True):
        cfg = get_preset("dae-tiny")
        cfg = replace(
            cfg,
            augment=AugmentConfig(enabled=enabled, probability=1.0),
            train=replace(cfg.train, max_steps=1, batch_size=4),
        )
        data = prepare_training_data(cfg, tiny_bench, progress=False)
        train(cfg, data, tmp_path / f"run-{enabled}", device="cpu", progress=False)
    raw, aug = seen[False][0], seen[True][0]
    assert raw.shape == aug.shape
    assert (aug - raw).abs().mean() > 0.01
    assert torch.all(aug[raw == 0] == 0)  # background stays background


# ------------------------------------------------------------------ Nyul standardisation


def test_nyul_maps_a_monotone_contrast_change_back(gen):
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 20, 10), bool)
    mask[2:18, 2:18] = True
    a = np.where(mask, rng.uniform(0.05, 1.0, mask.shape), 0).astype(np.float32)
    b = np.where(mask, a**1.8, 0).astype(np.float32)  # another site: same order, other contrast
    target = nyul_landmarks(a, mask)
    std = nyul_standardise(b, mask, target)
    np.testing.assert_allclose(nyul_landmarks(std, mask), target, atol=2e-3)
    assert np.abs(std - a)[mask].mean() < 0.01
    assert np.all(std[~mask] == 0)


def test_learned_landmarks_are_the_mean():
    class V:
        def __init__(self, img, m):
            self.image, self.brain_mask = img, m

    m = np.ones((10, 10, 4), bool)
    v1 = V(np.linspace(0, 1, 400).reshape(m.shape), m)
    v2 = V(np.linspace(0, 0.5, 400).reshape(m.shape), m)
    lm = learn_landmarks([v1, v2])
    assert len(lm) == len(NYUL_PERCENTILES)
    np.testing.assert_allclose(lm, 0.75 * np.array(NYUL_PERCENTILES) / 100, atol=1e-4)


@pytest.mark.slow
def test_nyul_needs_landmarks(tiny_bench):
    from maediff.data.datasets import load_subject
    from maediff.data.splits import read_pddpm_split

    s = read_pddpm_split(tiny_bench, "Brats21", "test")[0]
    cfg = replace(get_preset("tiny").data, standardise="nyul")
    with pytest.raises(DataError, match="needs data.landmarks"):
        load_subject(s, cfg)
    raw = load_subject(s, get_preset("tiny").data)
    lm = learn_landmarks([raw])
    std = load_subject(s, replace(cfg, landmarks=lm))
    np.testing.assert_allclose(nyul_landmarks(std.image, std.brain_mask), lm, atol=1e-3)
    with pytest.raises(ValueError, match="data.landmarks must hold"):
        replace(cfg, landmarks=(0.1, 0.2))


# ------------------------------------------------------------------ second site


def test_site_b_is_another_acquisition():
    from maediff.data.synthetic import SynthConfig, make_subject

    a = make_subject(0, "healthy", 0, "a")
    b = make_subject(0, "healthy", 0, "b")
    assert not np.array_equal(a["mask"], b["mask"])  # other subjects
    ratios = []
    for v in (a, b):
        img, m = v["image"], v["mask"] > 0
        lo, mid, hi = np.percentile(img[m], [10, 50, 95])
        ratios.append((lo / hi, mid / hi))
    # white and grey matter (low and middle percentiles) closer to CSF (high) at site B
    assert ratios[1][0] > ratios[0][0] + 0.07 and ratios[1][1] > ratios[0][1] + 0.07
    with pytest.raises(ValueError, match="site 'c'"):
        SynthConfig(site="c")
