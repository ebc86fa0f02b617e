import math

import pytest
import torch

from maediff.diffusion.process import DiffusionConfig, GaussianDiffusion, cosine_betas, linear_betas


def test_linear_schedule_goldens():
    d = GaussianDiffusion(DiffusionConfig())
    assert d.betas.dtype == torch.float64
    assert d.alphas_cumprod[499].item() == pytest.approx(0.078587, abs=5e-7)
    assert d.alphas_cumprod[999].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert d.posterior_variance[487].item() == pytest.approx(0.0097916, abs=5e-8)
    # t is 1-based: alpha_bar(500) is the 0-based entry 499
    assert d.alpha_bar(torch.tensor([500])).item() == d.alphas_cumprod[499].item()


def test_linear_schedule_by_hand():
    b = linear_betas(5, 0.1, 0.5)
    torch.testing.assert_close(b, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))
    d = GaussianDiffusion(
        DiffusionConfig(timesteps=5, beta_start=0.1, beta_end=0.5, t_test=3, t_train_max=5)
    )
    assert d.alphas_cumprod[2].item() == pytest.approx(0.9 * 0.8 * 0.7)


def test_cosine_schedule_formula():
    T, s = 1000, 0.008
    b = cosine_betas(T, s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = torch.cumprod(1 - b, 0)
    for t in (1, 250, 500, 900):
        assert ab[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert b.max().item() <= 0.999


def test_q_sample_matches_eq3_in_float64():
    d = GaussianDiffusion(DiffusionConfig())
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 500, 1000])
    out = d.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        ab = 1.0
        for s in range(1, ti + 1):
            ab *= 1 - (1e-4 + (2e-2 - 1e-4) * (s - 1) / 999)
        torch.testing.assert_close(out[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i])


def test_the_coefficients_of_eq3_invert_q_sample():
    """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), with the coefficients the
    models read (MAEDiff's preconditioning, the probe)."""
    d = GaussianDiffusion(DiffusionConfig())
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([3, 100, 500, 999])
    xt = d.q_sample(x0, t, eps)
    a, b = d.coefficients(t, xt)
    torch.testing.assert_close((xt - b * eps) / a, x0)
    torch.testing.assert_close((xt - a * x0) / b, eps)


def test_posterior_step_is_the_posterior_mean_of_eq6():
    """Paper Eq. 6 in the eps form, mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) /
    sqrt(alpha_t), is the x0-form step the models take (posterior_step, no noise) with
    x_0 predicted from eps by hand."""
    d = GaussianDiffusion(DiffusionConfig())
    xt = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(xt)
    t = torch.tensor([321])
    beta = d.betas[320].item()
    ab = d.alphas_cumprod[320].item()
    expected = (xt - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta)
    x0 = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    got = d.posterior_step(xt, t, t - 1, x0, torch.zeros_like(xt))
    torch.testing.assert_close(got, expected)


def test_timesteps_out_of_range_and_sampling():
    d = GaussianDiffusion(DiffusionConfig(t_train_min=10, t_train_max=20))
    with pytest.raises(ValueError, match="1..1000"):
        d.q_sample(torch.zeros(1, 1, 2, 2), torch.tensor([0]), torch.zeros(1, 1, 2, 2))
    t = d.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert t.min() >= 10 and t.max() <= 20 and len(t.unique()) == 11


def test_posterior_step_is_the_ddpm_posterior_for_adjacent_steps():
    d = GaussianDiffusion(DiffusionConfig())
    t = torch.tensor([488, 2])
    x0, xt = (
        torch.randn(2, 1, 4, 4, dtype=torch.float64),
        torch.randn(2, 1, 4, 4, dtype=torch.float64),
    )
    zero, one = torch.zeros_like(x0), torch.ones_like(x0)
    ab, b = d.alphas_cumprod, d.betas
    for i, ti in enumerate(t.tolist()):
        a_t, a_p, beta = ab[ti - 1], ab[ti - 2], b[ti - 1]
        mean = (
            a_p.sqrt() * beta / (1 - a_t) * x0[i]
            + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * xt[i]
        )
        got = d.posterior_step(xt, t, t - 1, x0, zero)[i]
        assert torch.allclose(got, mean, atol=1e-12)
        spread = d.posterior_step(xt, t, t - 1, x0, one)[i] - got
        assert torch.allclose(
            spread, d.posterior_variance[ti - 1].sqrt() * torch.ones_like(got), atol=1e-12
        )
    assert torch.equal(d.posterior_step(xt, t, torch.zeros_like(t), x0, one), x0)  # t' = 0 is x0


@pytest.mark.slow  # iterative sampling over many steps
def test_anoddpm_iterative_sampling_uses_the_requested_steps():
    from maediff.config import apply_overrides, get_preset
    from maediff.models import build_model

    m = build_model(apply_overrides(get_preset("anoddpm-tiny"), ["diffusion.sample_steps=4"]))
    assert m.timesteps() == [500, 375, 250, 125, 0]
    calls = []
    m.reconstruct(torch.rand(2, 1, 32, 32), torch.Generator().manual_seed(0), progress=calls.append)
    assert calls == [2, 2, 2, 2]  # one network pass per step for both slices
    with pytest.raises(
        ValueError, match="sample_steps=3: iterative sampling is an option of model anoddpm"
    ):
        apply_overrides(get_preset("tiny"), ["diffusion.sample_steps=3"])
