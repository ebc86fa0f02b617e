from dataclasses import replace

import pytest
import torch

from maediff.config import get_preset, validate
from maediff.models import build_model
from maediff.models.maediff import MAEDiff, from_model_range, to_model_range


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MAEDiff(get_preset("tiny")).eval()


def _capture_net_inputs(model):
    seen = []
    handle = model.net.register_forward_pre_hook(
        lambda m, args: seen.append([a.clone() if torch.is_tensor(a) else a for a in args])
    )
    return seen, handle


def test_loss_is_a_finite_scalar(model, gen):
    loss = model.loss(torch.rand(4, 1, 32, 32), gen)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_pixels_outside_the_patch_reach_the_network_unchanged(model, gen):
    x = torch.rand(6, 1, 32, 32)
    seen, h = _capture_net_inputs(model)
    model.loss(x, gen)
    h.remove()
    x_tilde, t, visible = seen[0][:3]
    xm = to_model_range(x)
    outside = ~(x_tilde == xm)  # pixels that differ must all be inside some 16x16 patch
    for i in range(6):
        diff = outside[i, 0].nonzero()
        assert len(diff) > 0
        r0, c0 = diff.min(0).values.tolist()
        r1, c1 = diff.max(0).values.tolist()
        assert r1 - r0 < 16 and c1 - c0 < 16
        # and the masked cells the MAE hides are exactly the ones of that patch
        assert (~visible[i]).sum() == 4
    assert ((t >= 1) & (t <= model.cfg.diffusion.timesteps)).all()


def test_loss_counts_only_the_noised_patch(model):
    """Eq. 9 with injected t, noise and patch index: mean |x0 - pred| over patch k only."""
    x = torch.rand(3, 1, 32, 32)
    t, k = torch.tensor([3, 10, 17]), torch.tensor([0, 4, 8])
    noise = torch.randn(3, 1, 32, 32)
    loss = model.loss(x, t=t, noise=noise, k=k)
    xm = to_model_range(x)
    x_t = model.diffusion.q_sample(xm, t, noise)
    with torch.no_grad():
        pred = model.denoise(model.noised_input(xm, x_t, k), t, k, xm)
    m = model.patch_masks[k]
    inside = ((xm - pred).abs() * m).sum() / m.sum()
    everywhere = (xm - pred).abs().mean()
    assert m.sum() == 3 * 16 * 16
    assert loss.item() == pytest.approx(inside.item(), rel=1e-5)
    assert abs(inside.item() - everywhere.item()) > 1e-3  # the two readings differ here


def test_background_weight_weights_the_patch_l1_by_hand():
    """diffusion.background_weight w: inside patch k a pixel with x0 = 0 counts w times a
    brain pixel; the loss is the weighted mean, computed here in float64."""
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, background_weight=0.25))
    model = MAEDiff(cfg).eval()
    x = torch.rand(2, 1, 32, 32)
    x[:, :, :, :12] = 0  # background on the left
    t, k, noise = torch.tensor([400, 600]), torch.tensor([0, 5]), torch.randn(2, 1, 32, 32)
    loss = model.loss(x, t=t, noise=noise, k=k)
    xm = to_model_range(x)
    with torch.no_grad():
        pred = model.denoise(
            model.noised_input(xm, model.diffusion.q_sample(xm, t, noise), k), t, k, xm
        )
    w = model.patch_masks[k].double() * torch.where(x > 0, 1.0, 0.25).double()
    expected = ((xm.double() - pred.double()).abs() * w).sum() / w.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = ((xm - pred).abs() * model.patch_masks[k]).sum() / model.patch_masks[k].sum()
    assert abs(loss.item() - plain.item()) > 1e-3  # the weighting changes the value here
    with pytest.raises(ValueError, match="background_weight"):
        replace(cfg.diffusion, background_weight=1.5)


def test_injected_random_inputs_replace_the_generator(model):
    x = torch.rand(2, 1, 32, 32)
    t, k, noise = torch.tensor([5, 6]), torch.tensor([1, 2]), torch.randn(2, 1, 32, 32)
    a = model.loss(x, torch.Generator().manual_seed(1), t=t, noise=noise, k=k)
    b = model.loss(x, torch.Generator().manual_seed(2), t=t, noise=noise, k=k)
    c = model.loss(x, torch.Generator().manual_seed(2))
    assert a.item() == b.item() and c.item() != a.item()


def _sequential_reconstruction(model, slices, noise):
    """Alg. 2 as written: one patch at a time, accumulate, divide once."""
    x0 = to_model_range(slices)
    t = torch.full((len(slices),), model.cfg.diffusion.t_test)
    xt = model.diffusion.q_sample(x0, t, noise)
    rec = torch.zeros_like(x0)
    count = torch.zeros_like(x0)
    for k in range(model.grid.num_patches):
        kk = torch.full((len(slices),), k)
        m = model.patch_masks[kk]
        x_tilde = xt * m + x0 * (1 - m)
        rec += model.denoise(x_tilde, t, kk, x0) * m
        count += m
    return from_model_range(rec / count)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batched_reconstruction_equals_sequential_loop(model, batch_size):
    g = torch.Generator().manual_seed(0)
    slices = torch.rand(5, 1, 32, 32)
    noise = model.noise(5, g)
    with torch.no_grad():
        ref = _sequential_reconstruction(model, slices, noise)
    out = model.reconstruct(slices, noise=noise, batch_size=batch_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.shape == slices.shape


def test_skipping_brain_free_patches_keeps_brain_pixels_exact(model):
    slices = torch.rand(3, 1, 32, 32)
    brain = torch.zeros_like(slices)
    brain[:, :, 2:6, 3:7] = 1  # only the patch at (0, 0) holds brain
    noise = model.noise(3, torch.Generator().manual_seed(0))
    calls = []
    full = model.reconstruct(slices, noise=noise, batch_size=5)
    part = model.reconstruct(
        slices, noise=noise, batch_size=5, brain_mask=brain, progress=calls.append
    )
    inside = brain.bool()
    torch.testing.assert_close(part[inside], full[inside], atol=1e-6, rtol=0)
    assert sum(calls) == 3  # one pair per slice was denoised
    with pytest.raises(ValueError, match="brain_mask"):
        model.reconstruct(slices, brain_mask=brain[:1])


def test_amp_auto_resolves_to_a_concrete_mode():
    from maediff.device import resolve_amp

    assert resolve_amp("auto", torch.device("cpu")) in ("bf16", "none")
    assert resolve_amp("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.slow
def test_reconstruct_bf16_is_close_to_fp32(model):
    slices = torch.rand(3, 1, 32, 32)
    noise = model.noise(3, torch.Generator().manual_seed(0))
    a = model.reconstruct(slices, noise=noise)
    b = model.reconstruct(slices, noise=noise, amp="bf16")
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.05


def test_reconstruct_is_deterministic_for_a_generator(model):
    s = torch.rand(2, 1, 32, 32)
    a = model.reconstruct(s, torch.Generator().manual_seed(3))
    b = model.reconstruct(s, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        model.loss(torch.rand(2, 1, 16, 16))
    bad = torch.rand(2, 1, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.reconstruct(bad)
    with pytest.raises(ValueError, match="noise"):
        model.reconstruct(torch.rand(2, 1, 32, 32), noise=torch.rand(1, 1, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("mae_on", [True, False])
def test_overfitting_one_batch_lowers_the_loss(mae_on):
    cfg = get_preset("tiny")
    cfg = replace(
        cfg, mae=replace(cfg.mae, enabled=mae_on), noise=replace(cfg.noise, kind="gaussian")
    )
    torch.manual_seed(0)
    model = MAEDiff(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.zeros(8, 1, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    x[:, 0] = 0.5 + 0.4 * torch.sin(xx / 5) * torch.cos(yy / 7)  # one smooth image, learnable

    def eval_loss():
        return (
            torch.stack([model.loss(x, torch.Generator().manual_seed(i)) for i in range(8)])
            .mean()
            .item()
        )

    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(80):  # 80 steps: about a quarter (MAE) and a third (no MAE) of the loss
        opt.zero_grad()
        model.loss(x, g).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_preconditioning_starts_from_the_linear_estimate_by_hand():
    """diffusion.precondition: with the zero-initialised output layer the prediction
    inside the patch is a sd^2 x / (a^2 sd^2 + b^2 sn^2) (computed here in float64), and
    the network sees the patch at unit variance; off, the network sees x~_t itself."""
    from dataclasses import replace as dc_replace

    from maediff.config import get_preset
    from maediff.models.maediff import MAEDiff

    cfg = get_preset("tiny")
    cfg = dc_replace(cfg, diffusion=dc_replace(cfg.diffusion, precondition=True))
    model = MAEDiff(cfg).eval()
    assert 0.2 < model.noise_std < 1.0  # unnormalised simplex octaves
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    t, k = torch.tensor([500, 80]), torch.tensor([0, 3])
    with torch.no_grad():
        pred = model.denoise(x, t, k, x)
        net_in, _, _ = model.precondition(x, t, k)
    ab = model.diffusion.alphas_cumprod[t - 1].double().view(-1, 1, 1, 1)
    a, b, sd, sn = ab.sqrt(), (1 - ab).sqrt(), 0.5, model.noise_std
    var = a * a * sd * sd + b * b * sn * sn
    m = model.patch_masks[k] > 0
    want = torch.where(m, x.double() * a * sd * sd / var, x.double())
    torch.testing.assert_close(pred.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        net_in.double(), torch.where(m, x.double() / var.sqrt(), x.double()), rtol=1e-5, atol=1e-6
    )
    plain = MAEDiff(get_preset("tiny")).eval()
    with torch.no_grad():
        assert torch.all(plain.denoise(x, t, k, x) == 0)  # zero-initialised output, no skip


def _guided_models(quantile):
    """The same weights: Alg. 2 at the full stride, guided selection, Alg. 2 at stride p."""
    from dataclasses import replace

    from conftest import draw_zero_layers

    cfg = get_preset("maediff-tiny")
    full = draw_zero_layers(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    inf = replace(cfg.inference, patch_selection="guided", guided_quantile=quantile)
    guided = build_model(replace(cfg, inference=inf)).eval()
    g = cfg.geometry
    coarse = build_model(replace(cfg, geometry=replace(g, stride=g.patch_size))).eval()
    for m in (guided, coarse):
        m.load_state_dict(full.state_dict())
    return full, guided, coarse


@pytest.mark.slow  # three full reconstructions by Alg. 2
def test_guided_selection_keeps_alg2_in_flagged_cells_and_the_coarse_pass_elsewhere():
    full, guided, coarse = _guided_models(0.8)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 32, 32, generator=g)
    x[1, :, 4:12, 16:24] = 1.0  # a bright square: an anomaly for the coarse pass
    noise = torch.randn(4, 1, 32, 32, generator=g)
    a, b, c = (m.reconstruct(x, noise=noise) for m in (full, guided, coarse))
    info = guided.last_guided
    assert 0 < info["fraction"] < 1
    r = full.cfg.geometry.grid_size
    flagged = info["flagged"].float().repeat_interleave(r, -1).repeat_interleave(r, -2) > 0
    assert flagged.any()
    assert torch.allclose(b[flagged], a[flagged], atol=1e-6)  # exactly Alg. 2 there
    covered = (
        guided.grid.stitch_selected(
            torch.ones(4, guided.grid.num_patches, 1, 16, 16), info["chosen"]
        )[1]
        > 0
    )
    assert (~covered).any()
    assert torch.allclose(b[~covered], c[~covered], atol=1e-6)  # the stride-p pass elsewhere
    # quantile 0: every cell but the lowest is flagged, so every patch is denoised
    full0, guided0, _ = _guided_models(0.0)
    want = full0.reconstruct(x, noise=noise)
    assert torch.allclose(guided0.reconstruct(x, noise=noise), want, atol=1e-6)
    assert guided0.last_guided["fraction"] == 1.0


def test_guided_selection_needs_a_tiling_and_maediff():
    from dataclasses import replace

    cfg = get_preset("maediff-tiny")
    inf = replace(cfg.inference, patch_selection="guided")
    with pytest.raises(ValueError, match="tiles the slice"):
        validate(replace(cfg, inference=inf, geometry=replace(cfg.geometry, image_size=40)))
    with pytest.raises(ValueError, match="is an option of model maediff"):
        validate(replace(get_preset("dae-tiny"), inference=inf))


@pytest.mark.parametrize("steps", [1, 3])
def test_anoddpm_honours_the_brain_mask(steps):
    """Slices without brain keep the input (inference.skip_empty_patches), in one step
    and in the iterative reverse process; the others are reconstructed as without it."""
    from conftest import draw_zero_layers

    cfg = get_preset("anoddpm-tiny")
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, sample_steps=steps))
    model = draw_zero_layers(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    brain = torch.zeros_like(x)
    brain[0, :, 8:24, 8:24] = 1
    brain[2, :, 4:9, 4:9] = 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with_mask = model.reconstruct(
        x, noise=noise, generator=torch.Generator().manual_seed(3), brain_mask=brain
    )
    assert torch.equal(with_mask[1], x[1])
    if steps == 1:  # one prediction per slice: the brain slices are unchanged by the mask
        without = model.reconstruct(x, noise=noise)
        assert torch.allclose(with_mask[[0, 2]], without[[0, 2]], atol=1e-6)
    else:
        assert not torch.allclose(with_mask[0], x[0])


# --------------------------------------------------------------------------- the one driver


@pytest.mark.parametrize(
    "name", ["thresh", "ae", "vae", "svae", "dae", "fanogan", "anoddpm", "maediff"]
)
def test_every_model_treats_range_and_empty_slices_the_same_way(name):
    """models/base.py's reconstruct serves every model: inference.clamp clamps all of
    them to [0, 1] (off: the model's output as it is), and with a brain mask a slice
    without brain keeps the input while the others are as without the mask."""
    from dataclasses import replace

    from maediff.models import build_model

    cfg = get_preset(f"{name}-tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    outs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1]
    if outs and outs[-1].bias is not None:  # push the output layer past the image range
        with torch.no_grad():
            outs[-1].bias += 3.0
    H = cfg.geometry.image_size
    x = torch.rand(3, 1, H, H) * 0.2 + 0.8
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    raw = model.reconstruct(x, g())
    model.cfg = replace(cfg, inference=replace(cfg.inference, clamp=True))
    clamped = model.reconstruct(x, g())
    assert 0 <= clamped.min() and clamped.max() <= 1
    assert torch.equal(clamped, raw.clamp(0, 1))
    if name not in ("thresh", "fanogan"):  # the image itself; a tanh generator
        assert not torch.equal(raw, clamped), "the test needs an output outside [0, 1]"
    model.cfg = cfg
    brain = torch.ones_like(x)
    brain[1] = 0
    masked = model.reconstruct(x, g(), brain_mask=brain)
    assert torch.equal(masked[1], x[1])
    if not model.draws_noise:  # the diffusion models draw their noise per slice
        assert torch.allclose(masked[[0, 2]], raw[[0, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="brain_mask must have the shape"):
        model.reconstruct(x, g(), brain_mask=brain[:2])
