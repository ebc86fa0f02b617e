"""The registered baselines (AE, VAE, SVAE, DAE, f-AnoGAN) at their -tiny presets:
the model contract, gradients, overfitting one batch, anomaly sensitivity, invalid
configurations, phases, determinism. Data: smooth synthetic "brains" (textured discs)."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch

from maediff.config import get_preset
from maediff.models import MODELS, build_model, count_parameters
from maediff.models.base import Phase

BASELINES = ("ae", "vae", "svae", "dae", "fanogan")
H = 32  # the tiny presets' image size
SLICES_PER_VOLUME = 4  # svae: training batches of 2 volumes x 4 slices
STEPS = {"gan": 120, "encoder": 80, "train": 150}  # per phase, on one fixed batch


# --------------------------------------------------------------------------- data


def grid() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, H), indexing="ij")


def brains(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, H, H) in [0, 1]: a disc with a smooth texture (0.4..0.7) on a zero background,
    jittered centre, radius and texture phase."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = grid()
    out = []
    for _ in range(n):
        c = (torch.rand(2, generator=g) - 0.5) * 0.1
        r = 0.7 + (torch.rand(1, generator=g).item() - 0.5) * 0.06
        phase = torch.rand(2, generator=g) * 6.28
        texture = 0.55 + 0.15 * torch.sin(2.5 * xx + phase[0]) * torch.cos(2.0 * yy + phase[1])
        inside = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 < r**2
        out.append(torch.where(inside, texture, torch.zeros(())))
    return torch.stack(out)[:, None]


def blob(amplitude: float = 0.4) -> torch.Tensor:
    """(H, H): a bright Gaussian lesion (sigma ~2 px) inside every disc."""
    yy, xx = grid()
    return amplitude * torch.exp(-((xx - 0.25) ** 2 + (yy + 0.2) ** 2) / (2 * 0.12**2))


def tiny(name: str, **sections) -> torch.nn.Module:
    cfg = get_preset(f"{name}-tiny")
    for section, values in sections.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    torch.manual_seed(0)
    return build_model(cfg)


def batch_for(model, n_slices: int = 4, seed: int = 0) -> torch.Tensor:
    """Slices (B, 1, H, W), or volumes (2, S, 1, H, W) for volume models."""
    if model.input_kind == "volumes":
        return brains(2 * SLICES_PER_VOLUME, seed).view(2, SLICES_PER_VOLUME, 1, H, H)
    return brains(n_slices, seed)


def fit(model, batch: torch.Tensor) -> dict[str, list[float]]:
    """The trainer's loop in small: one Adam per optimizer group, enter_phase, groups
    cycled per step; STEPS[phase] steps per phase. Returns the losses per group."""
    lr = model.cfg.train.lr
    opts = {
        name: torch.optim.Adam(g.params, lr=g.lr or lr, **({"betas": g.betas} if g.betas else {}))
        for name, g in model.optimizer_groups().items()
    }
    gen = torch.Generator().manual_seed(0)
    history: dict[str, list[float]] = {}
    model.train()
    for phase in model.phases:
        model.enter_phase(phase)
        for step in range(STEPS[phase.name]):
            group = phase.groups[step % len(phase.groups)]
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            loss = model(batch, gen, group=group)
            loss.backward()
            opts[group].step()
            history.setdefault(group, []).append(loss.item())
    model.eval()
    return history


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny networks only lose from a second thread (and much more on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """Each baseline overfitted once on its fixed healthy batch (shared by two tests)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = tiny(name)
            batch = batch_for(model)
            cache[name] = (model, batch, fit(model, batch))
        return cache[name]

    return get


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", BASELINES)
def test_registered_and_built_from_presets(name):
    for preset in (name, f"{name}-cpu", f"{name}-tiny"):
        model = build_model(get_preset(preset))
        assert type(model) is MODELS[name] and model.registry_name == name
    assert MODELS[name].input_kind == ("volumes" if name == "svae" else "slices")
    assert count_parameters(build_model(get_preset(f"{name}-cpu"))) < count_parameters(
        build_model(get_preset(name))
    )


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("name", BASELINES)
def test_reconstruct_shape_range_and_progress(name):
    model = tiny(name)
    slices = torch.rand(5, 1, H, H)
    done = []
    rec = model.reconstruct(
        slices, torch.Generator().manual_seed(0), batch_size=2, progress=done.append
    )
    assert rec.shape == slices.shape and rec.dtype == torch.float32
    assert sum(done) == 5 and done == [2, 2, 1]
    # batch composition does not matter: the same result in one pass
    assert torch.allclose(model.reconstruct(slices, batch_size=64), rec, atol=1e-5)


@pytest.mark.parametrize("name", BASELINES)
def test_reconstruct_rejects_noise_and_bad_shapes(name):
    model = tiny(name)
    with pytest.raises(ValueError, match="noise"):
        model.reconstruct(torch.rand(2, 1, H, H), noise=torch.randn(2, 1, H, H))
    with pytest.raises(ValueError, match="expected images"):
        model.reconstruct(torch.rand(2, 1, H + 8, H + 8))


def test_fanogan_reconstruct_uses_running_statistics_and_keeps_modes():
    model = tiny("fanogan")
    model.train()
    slices = torch.rand(3, 1, H, H)
    rec = model.reconstruct(slices)
    assert model.training and model.generator.training and model.encoder.training
    model.eval()
    assert torch.allclose(model.reconstruct(slices), rec)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", BASELINES)
def test_every_parameter_gets_a_finite_gradient(name):
    """Each group's loss reaches all of that group's parameters; the groups cover the model."""
    model = tiny(name)
    batch = batch_for(model)
    groups = model.optimizer_groups()
    covered = set()
    for group, spec in groups.items():
        model.zero_grad(set_to_none=True)
        model.loss(batch, torch.Generator().manual_seed(0), group=group).backward()
        for p in spec.params:
            assert p.grad is not None, f"{name}/{group}: a parameter got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}/{group}: non-finite gradient"
        assert sum(p.grad.abs().sum() for p in spec.params) > 0
        covered |= {id(p) for p in spec.params}
    assert covered == {id(p) for p in model.parameters()}


def test_svae_transformer_is_in_the_gradient_path():
    model = tiny("svae")
    model.loss(batch_for(model), torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.context.parameters())


# --------------------------------------------------------------------------- overfitting


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_overfitting_one_batch_lowers_the_loss(name, trained):
    """The training loss ends below half its first value. f-AnoGAN: that is the izi_f loss
    of the encoder phase (G and D frozen), and the critic loss falls in the GAN phase."""
    _, _, history = trained(name)
    assert all(math.isfinite(v) for curve in history.values() for v in curve)
    curve = history["encoder" if name == "fanogan" else "model"]
    last = sum(curve[-10:]) / 10
    assert last < 0.5 * curve[0], f"{name}: loss {curve[0]:.4f} -> {last:.4f}"
    if name == "fanogan":
        critic = history["critic"]
        assert sum(critic[-10:]) / 10 < sum(critic[:10]) / 10 - 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_inserted_blob_gives_a_larger_error_than_the_healthy_slice(name, trained):
    """After overfitting healthy slices, the reconstruction error inside an inserted bright
    blob exceeds the healthy slice's error at the same pixels by half the blob's height."""
    model, batch, _ = trained(name)
    healthy = batch[0] if model.input_kind == "volumes" else batch  # (S, 1, H, W)
    k = 1  # the slice that gets the lesion
    lesion = blob()
    region = lesion > 0.5 * lesion.max()
    sick = healthy.clone()
    sick[k, 0] = (sick[k, 0] + lesion).clamp(max=1)
    err_healthy = (healthy - model.reconstruct(healthy))[k, 0].abs()[region].mean()
    err_sick = (sick - model.reconstruct(sick))[k, 0].abs()[region].mean()
    height = (sick - healthy)[k, 0][region].mean()
    assert err_sick > err_healthy + 0.5 * height, (
        f"{name}: error in the blob {err_sick:.3f} vs healthy {err_healthy:.3f} (blob {height:.3f})"
    )


# --------------------------------------------------------------------------- determinism


STOCHASTIC_GROUP = {"fanogan": "critic"}


@pytest.mark.parametrize("name", BASELINES)
def test_same_seed_same_loss(name):
    model = tiny(name)
    batch = batch_for(model)
    group = STOCHASTIC_GROUP.get(name, "model")

    def loss(seed: int) -> float:
        return model.loss(batch, torch.Generator().manual_seed(seed), group=group).item()

    assert loss(3) == loss(3)
    assert loss(3) != loss(4)  # the generator drives every draw


def test_injected_random_inputs_replace_the_draws():
    vae = tiny("vae", autoencoder={"dropout": 0.0})
    x = brains(3)
    eps = torch.zeros(3, vae.cfg.autoencoder.latent_dim)
    a = vae.loss(x, torch.Generator().manual_seed(1), eps=eps)
    assert torch.equal(a, vae.loss(x, torch.Generator().manual_seed(2), eps=eps))

    dae = tiny("dae")
    zero = torch.zeros_like(x)
    clean = ((dae.net(x) - x).pow(2) * (x > 0)).mean()
    assert torch.allclose(dae.loss(x, torch.Generator().manual_seed(1), noise=zero), clean)

    gan = tiny("fanogan")
    z = torch.randn(3, gan.cfg.fanogan.latent_dim)
    gan.eval()  # BatchNorm with running statistics: G(z) is a function of z alone
    expected = -gan.critic(gan.generator(z)).mean()
    assert torch.allclose(gan.loss(x, torch.Generator().manual_seed(5), "generator", z=z), expected)


def test_dae_noise_is_coarse_and_only_on_the_foreground():
    model = tiny("dae")
    noise = model.coarse_noise(64, torch.Generator().manual_seed(0))
    assert noise.shape == (64, 1, H, H)
    assert 0.4 * model.cfg.dae.noise_std < noise.std() < model.cfg.dae.noise_std  # bilinear
    louder = tiny("dae", dae={"noise_std": 0.4}).coarse_noise(64, torch.Generator().manual_seed(0))
    assert torch.allclose(louder, 2 * noise)
    # smooth: neighbouring pixels nearly equal (4 x 4 values spread over 32 x 32 pixels)
    assert (noise[..., 1:] - noise[..., :-1]).abs().mean() < 0.25 * noise.abs().mean()
    x = brains(2)
    seen = []
    model.net.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model.loss(x, noise=noise[:2])
    assert torch.equal(seen[0][x == 0], x[x == 0])  # background untouched


# --------------------------------------------------------------------------- svae


def test_svae_rejects_slice_batches():
    model = tiny("svae")
    with pytest.raises(ValueError, match=r"whole volumes \(B, S, 1, H, W\)"):
        model.loss(brains(4))


@pytest.mark.parametrize("S", [1, 3, 11])
def test_svae_reconstructs_any_number_of_slices(S):
    model = tiny("svae")
    rec = model.reconstruct(brains(S), batch_size=2)
    assert rec.shape == (S, 1, H, H) and torch.isfinite(rec).all()
    # the sequence does not depend on the batch size
    assert torch.allclose(model.reconstruct(brains(S), batch_size=64), rec, atol=1e-5)


def test_svae_slices_see_each_other():
    model = tiny("svae").eval()
    vol = brains(5)
    rec = model.reconstruct(vol)
    changed = vol.clone()
    changed[0] = 0
    rec2 = model.reconstruct(changed)
    assert not torch.allclose(rec[2], rec2[2], atol=1e-6)  # slice 2 depends on slice 0


# --------------------------------------------------------------------------- f-AnoGAN


def test_fanogan_phases_and_groups():
    model = tiny("fanogan")
    f = model.cfg.fanogan
    gan, enc = model.phases
    assert (gan.name, enc.name) == ("gan", "encoder")
    assert gan.groups == ("critic",) * f.n_critic + ("generator",) and enc.groups == ("encoder",)
    assert gan.fraction == pytest.approx(f.gan_fraction)
    assert gan.fraction + enc.fraction == pytest.approx(1)
    groups = model.optimizer_groups()
    assert groups["critic"].betas == groups["generator"].betas == (f.beta1, f.beta2)
    assert groups["encoder"].lr == f.encoder_lr
    owners = {"critic": model.critic, "generator": model.generator, "encoder": model.encoder}
    for name, module in owners.items():
        assert {id(p) for p in groups[name].params} == {id(p) for p in module.parameters()}
    with pytest.raises(ValueError, match="no optimizer group 'model'"):
        model.loss(brains(2))


def test_fanogan_enter_phase_freezes_generator_and_critic():
    model = tiny("fanogan")
    gan, enc = model.phases
    model.enter_phase(enc)
    assert not any(p.requires_grad for m in (model.generator, model.critic) for p in m.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    model.loss(brains(2), group="encoder").backward()
    assert all(p.grad is None for m in (model.generator, model.critic) for p in m.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    model.enter_phase(gan)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="'warmup'"):
        model.enter_phase(Phase("warmup", 1.0))


def test_fanogan_gradient_penalty_matches_its_definition():
    """alpha = 0 puts the penalty at the real images: (||grad_x D(x)|| - 1)^2."""
    model = tiny("fanogan").eval()
    x = brains(3)
    z = torch.randn(3, model.cfg.fanogan.latent_dim)
    loss = model.loss(x, group="critic", z=z, alpha=torch.zeros(3))
    xm = (x * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(model.critic(xm).sum(), xm)
    penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
    with torch.no_grad():
        wasserstein = model.critic(model.generator(z)).mean() - model.critic(x * 2 - 1).mean()
    expected = wasserstein + model.cfg.fanogan.gp_weight * penalty
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- configuration


INVALID = [
    ("ae", "autoencoder", "loss", "l3"),
    ("ae", "autoencoder", "kernel_size", 4),
    ("ae", "autoencoder", "dropout", 1.0),
    ("ae", "autoencoder", "channels", (8, 0)),
    ("ae", "autoencoder", "channels", (8, 8, 8, 8, 8, 8)),  # 2^6 does not divide 32
    ("vae", "autoencoder", "kl_weight", -1.0),
    ("vae", "autoencoder", "latent_dim", 0),
    ("svae", "svae", "heads", 3),  # does not divide latent_dim 32
    ("svae", "svae", "depth", 0),
    ("svae", "svae", "dropout", -0.1),
    ("dae", "dae", "noise_res", 0),
    ("dae", "dae", "noise_res", 33),
    ("dae", "dae", "noise_std", -0.2),
    ("dae", "dae", "channels", (8, 8, 8, 8, 8, 8, 8)),  # 2^6 does not divide 32
    ("fanogan", "fanogan", "n_critic", 0),
    ("fanogan", "fanogan", "gan_fraction", 1.0),
    ("fanogan", "fanogan", "gp_weight", -1.0),
    ("fanogan", "fanogan", "channels", (8,)),
    ("fanogan", "fanogan", "encoder_lr", 0.0),
    ("fanogan", "fanogan", "beta2", 1.0),
]


@pytest.mark.parametrize(("name", "section", "key", "value"), INVALID)
def test_invalid_configuration_names_the_value(name, section, key, value):
    cfg = get_preset(f"{name}-tiny")
    field = "betas" if key.startswith("beta") else f"{section}.{key}"
    with pytest.raises(ValueError, match=re.escape(field)):
        replace(cfg, **{section: replace(getattr(cfg, section), **{key: value})})


def test_a_configuration_holds_only_its_models_sections():
    cfg = get_preset("maediff-tiny")
    assert cfg.section_names == ("unet", "mae", "diffusion", "noise")
    with pytest.raises(AttributeError, match="no section 'dae'"):
        assert cfg.dae is None
    # a section of another model is refused by name, not silently carried
    dae = get_preset("dae-tiny")
    with pytest.raises(ValueError, match=r"\['dae'\] do not belong to model 'maediff'"):
        replace(cfg, dae=replace(dae.dae, channels=(8,) * 7))
    # changing the model drops the old model's sections and gives the new one its defaults
    moved = replace(cfg, model="dae")
    assert moved.section_names == ("dae",) and moved.dae == type(dae.dae)()
    assert replace(dae, model="ae").section_names == ("autoencoder",)
