import numpy as np
import pytest
import torch

from maediff.diffusion.noise import (
    NoiseConfig,
    NoiseSampler,
    opensimplex2,
    random_permutations,
    simplex_octaves,
)


def _reference_perm(seed):
    opensimplex = pytest.importorskip("opensimplex")
    os_ = opensimplex.OpenSimplex(seed)
    return os_, torch.from_numpy(np.asarray(os_._perm, dtype=np.int64))[None]


@pytest.mark.parametrize("seed", [0, 3, 1234])
def test_opensimplex_matches_reference_package(seed):
    os_, perm = _reference_perm(seed)
    xs = np.linspace(-20.3, 17.9, 61)
    ys = np.linspace(-11.0, 29.5, 43)
    ref = os_.noise2array(xs, ys)  # (len(ys), len(xs))
    X = torch.tensor(xs).repeat(len(ys))
    Y = torch.tensor(ys).repeat_interleave(len(xs))
    ours = opensimplex2(X, Y, perm).view(len(ys), len(xs)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_octaves_match_reference_sum():
    os_, perm = _reference_perm(7)
    H, W = 20, 24
    ref = np.zeros((H, W))
    freq, amp = 64.0, 1.0
    for _ in range(6):  # AnoDDPM: coordinates / 64, / 32, ...; amplitude *= 0.8
        ref += amp * os_.noise2array(np.arange(W) / freq, np.arange(H) / freq)
        freq /= 2
        amp *= 0.8
    ours = simplex_octaves(perm, (H, W), 6, 0.8, 2.0**-6, dtype=torch.float64)[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_per_sample_fields_are_distinct_and_seeded():
    s = NoiseSampler(NoiseConfig(), (32, 32))
    a = s(4, torch.Generator().manual_seed(0))
    b = s(4, torch.Generator().manual_seed(0))
    c = s(4, torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])


def test_reference_parity_mode_repeats_one_unnormalised_field():
    s = NoiseSampler(NoiseConfig(shared=True, normalise=False), (48, 48))
    f = s(5, torch.Generator().manual_seed(0))
    assert all(torch.equal(f[0], f[i]) for i in range(5))
    assert 0.2 < f.std().item() < 1.0  # unnormalised octave sum: well below unit std


def test_normalised_fields_have_unit_std():
    f = NoiseSampler(NoiseConfig(normalise=True), (48, 48))(6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(f.mean(dim=(2, 3)), torch.zeros(6, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.std(dim=(2, 3)), torch.ones(6, 1), atol=1e-4, rtol=0)


def test_zero_mean_fields_keep_their_shape_and_lose_their_mean():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    raw = NoiseSampler(NoiseConfig(), (48, 48))(6, g())
    f = NoiseSampler(NoiseConfig(zero_mean=True), (48, 48))(6, g())
    assert raw.mean(dim=(2, 3)).abs().max() > 0.02  # the reference's fields carry an offset
    torch.testing.assert_close(f.mean(dim=(2, 3)), torch.zeros(6, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(f, raw - raw.mean(dim=(2, 3), keepdim=True))


def test_gaussian_and_bank_modes():
    g = NoiseSampler(NoiseConfig(kind="gaussian"), (16, 16))(3, torch.Generator().manual_seed(0))
    assert g.shape == (3, 1, 16, 16)
    bank = NoiseSampler(NoiseConfig(bank_size=4), (16, 16))
    f1 = bank(8, torch.Generator().manual_seed(0))
    f2 = NoiseSampler(NoiseConfig(bank_size=4), (16, 16))(8, torch.Generator().manual_seed(0))
    assert f1.shape == (8, 1, 16, 16) and torch.equal(f1, f2)
    # bank windows come from the same kind of fields: similar spread as fresh fields
    fresh = NoiseSampler(NoiseConfig(), (16, 16))(8, torch.Generator().manual_seed(0))
    assert 0.3 < f1.std().item() / fresh.std().item() < 3


def test_permutations_are_permutations():
    p = random_permutations(3, torch.Generator().manual_seed(0))
    assert p.shape == (3, 256)
    assert all(torch.equal(torch.sort(row).values, torch.arange(256)) for row in p)
