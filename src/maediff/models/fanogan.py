"""f-AnoGAN (Schlegl et al. 2019): a WGAN-GP on healthy slices, then an encoder trained
with the generator and critic frozen (izi_f); anomaly map = |x - G(E(x))|
(docs/baselines.md).

    phase "gan":     critic x n_critic, generator x 1, cycled (Adam, betas (0, 0.9))
      critic:    D(G(z)) - D(x) + gp_weight * (||grad D(x^)|| - 1)^2,  x^ = x + a (G(z) - x)
      generator: -D(G(z))
    phase "encoder": izi_f = mean (x - G(E(x)))^2 + feature_weight * mean (f(x) - f(G(E(x))))^2
                     f = the critic's last feature map (flattened), G and D frozen

Networks (Gulrajani's ResNet GAN as Schlegl use it): images in [-1, 1]; critic and
encoder: 3x3 conv, then per further width a residual block that halves the size, then a
linear layer (critic: 1 output, LayerNorm in its blocks; encoder: latent_dim with tanh,
BatchNorm). Generator: linear to the smallest map, residual blocks that double the size
with the widths reversed, BatchNorm, ReLU, 3x3 conv, tanh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, check_downsampling, check_widths, describe_size
from ..registry import Preset, check, register_section
from .autoencoders import check_group
from .base import AnomalyModel, OptimizerGroup, Phase
from .register import register_model


@dataclass(frozen=True)
class FAnoGANConfig:
    """WGAN-GP then an izi_f encoder (Schlegl et al. 2019)."""

    latent_dim: int = 128  # z (Schlegl: ZDIM = 128)
    # input-conv width, then the output width of each residual (re)sampling block of the
    # critic and encoder; the generator mirrors it (Schlegl, DIM = 64: 64, 128, 256, 512, 512)
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    n_critic: int = 5  # critic updates per generator update
    gp_weight: float = 10.0  # lambda of the gradient penalty
    feature_weight: float = 1.0  # kappa of the izi_f loss
    gan_fraction: float = 0.7  # share of the training budget spent on the WGAN stage
    beta1: float = 0.0  # Adam betas of the GAN stage (WGAN-GP: 0.0, 0.9)
    beta2: float = 0.9
    encoder_lr: float = 5e-5  # learning rate of the encoder stage (Schlegl: 5e-5)

    def __post_init__(self) -> None:
        check_widths("fanogan.channels", self.channels)
        check(
            len(self.channels) >= 2, f"fanogan.channels={self.channels!r} needs at least 2 entries"
        )
        check(self.latent_dim >= 1, f"fanogan.latent_dim={self.latent_dim} must be >= 1")
        check(self.n_critic >= 1, f"fanogan.n_critic={self.n_critic} must be >= 1")
        check(self.gp_weight >= 0, f"fanogan.gp_weight={self.gp_weight} must be >= 0")
        check(
            self.feature_weight >= 0, f"fanogan.feature_weight={self.feature_weight} must be >= 0"
        )
        check(
            0.0 < self.gan_fraction < 1.0,
            f"fanogan.gan_fraction={self.gan_fraction} must be in (0, 1)",
        )
        check(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
            f"fanogan betas ({self.beta1}, {self.beta2}) must be in [0, 1)",
        )
        check(self.encoder_lr > 0, f"fanogan.encoder_lr={self.encoder_lr} must be > 0")


register_section(
    "fanogan",
    FAnoGANConfig,
    # encoder lr: half the GAN's train.lr, as Schlegl's 5e-5 vs 1e-4
    cpu=lambda f: replace(f, latent_dim=64, channels=(8, 16, 32, 64, 64), encoder_lr=5e-4),
    tiny=lambda f: replace(f, latent_dim=16, channels=(8, 8, 16, 16), encoder_lr=1e-2),
)


def layer_norm(channels: int) -> nn.GroupNorm:
    """LayerNorm over (C, H, W) with a per-channel affine: the WGAN-GP critic's norm."""
    return nn.GroupNorm(1, channels)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """BatchNorm with running statistics inside the block, previous modes restored after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class ResBlock(nn.Module):
    """norm, ReLU, conv, norm, ReLU, conv; "down" mean-pools after the second conv, "up"
    upsamples (nearest) before the first; the shortcut is a resampled 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, resample: str, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.resample = resample
        mid = c_in if resample == "down" else c_out
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, mid, 3, padding=1)
        self.norm2, self.conv2 = norm(mid), nn.Conv2d(mid, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(x))
        if self.resample == "up":
            x, h = F.interpolate(x, scale_factor=2.0), F.interpolate(h, scale_factor=2.0)
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        if self.resample == "down":
            x, h = F.avg_pool2d(x, 2), F.avg_pool2d(h, 2)
        return self.shortcut(x) + h


class DownNet(nn.Module):
    """Critic / encoder backbone: (B, 1, H, W) -> features (B, F) -> head (B, out_dim)."""

    def __init__(self, channels: tuple[int, ...], image_size: int, norm, out_dim: int):
        super().__init__()
        side = image_size // 2 ** (len(channels) - 1)
        self.input = nn.Conv2d(1, channels[0], 3, padding=1)
        self.blocks = nn.Sequential(
            *(ResBlock(i, o, "down", norm) for i, o in zip(channels, channels[1:]))
        )
        self.head = nn.Linear(channels[-1] * side * side, out_dim)

    def features(self, x: Tensor) -> Tensor:
        return self.blocks(self.input(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Generator(nn.Module):
    """z (B, D) -> image (B, 1, H, W) in [-1, 1]."""

    def __init__(self, latent_dim: int, channels: tuple[int, ...], image_size: int):
        super().__init__()
        widths = channels[::-1]
        self.side = image_size // 2 ** (len(channels) - 1)
        self.input = nn.Linear(latent_dim, widths[0] * self.side**2)
        self.blocks = nn.Sequential(
            *(ResBlock(i, o, "up", nn.BatchNorm2d) for i, o in zip(widths, widths[1:]))
        )
        self.out = nn.Sequential(
            nn.BatchNorm2d(widths[-1]), nn.ReLU(), nn.Conv2d(widths[-1], 1, 3, padding=1), nn.Tanh()
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.input(z).view(z.shape[0], -1, self.side, self.side)
        return self.out(self.blocks(h))


def _check_fanogan(cfg: Config) -> None:
    check_downsampling(cfg, "fanogan.channels", len(cfg.section(FAnoGANConfig).channels) - 1)


def _describe_fanogan(cfg: Config) -> str:
    f = cfg.section(FAnoGANConfig)
    return (
        f"{describe_size(cfg)}, WGAN-GP + izi_f encoder, "
        f"widths {list(f.channels)}, z={f.latent_dim}"
    )


def fanogan_update_budget(cfg: Config, updates: int) -> Config:
    """`updates` generator and encoder updates (docs/baselines.md §Budgets): the WGAN
    cycles n_critic critic steps and one generator step, so (n_critic + 1) * updates
    GAN steps, then `updates` encoder steps."""
    gan = (cfg.section(FAnoGANConfig).n_critic + 1) * updates
    return replace(
        cfg,
        train=replace(cfg.train, max_steps=gan + updates),
        fanogan=replace(cfg.section(FAnoGANConfig), gan_fraction=gan / (gan + updates)),
    )


def fanogan_update_counts(cfg: Config) -> tuple[int, int, int]:
    """(generator, critic, encoder) updates of cfg.train.max_steps, as the phases share
    them (the inverse of fanogan_update_budget)."""
    f, steps = cfg.fanogan, cfg.train.max_steps
    gan = round(steps * f.gan_fraction)
    gen = gan // (f.n_critic + 1)
    return gen, gan - gen, steps - gan


@register_model(
    "fanogan",
    sections=("fanogan",),
    presets=(Preset("fanogan", "f-AnoGAN", table=("1", 60)),),
    check=_check_fanogan,
    describe=_describe_fanogan,
    update_budget=fanogan_update_budget,
)
class FAnoGAN(AnomalyModel):
    description = "WGAN-GP with an izi_f encoder (f-AnoGAN, Schlegl et al. 2019)"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        f, H = cfg.section(FAnoGANConfig), cfg.geometry.image_size
        self.generator = Generator(f.latent_dim, f.channels, H)
        self.critic = DownNet(f.channels, H, layer_norm, 1)
        self.encoder = DownNet(f.channels, H, nn.BatchNorm2d, f.latent_dim)

    @classmethod
    def update_budget_text(cls, cfg: Config) -> str:
        gen, critic, encoder = fanogan_update_counts(cfg)
        return (
            f"{gen} generator + {encoder} encoder updates "
            f"(and {critic} critic updates), {cfg.train.batch_size} slices each"
        )

    # ------------------------------------------------------------------ training contract

    @property
    def phases(self) -> tuple[Phase, ...]:
        f = self.cfg.section(FAnoGANConfig)
        return (
            Phase("gan", f.gan_fraction, ("critic",) * f.n_critic + ("generator",)),
            Phase("encoder", 1.0 - f.gan_fraction, ("encoder",)),
        )

    def optimizer_groups(self) -> dict[str, OptimizerGroup]:
        f = self.cfg.section(FAnoGANConfig)
        betas = (f.beta1, f.beta2)
        return {
            "critic": OptimizerGroup(list(self.critic.parameters()), betas=betas),
            "generator": OptimizerGroup(list(self.generator.parameters()), betas=betas),
            "encoder": OptimizerGroup(list(self.encoder.parameters()), lr=f.encoder_lr),
        }

    def enter_phase(self, phase: Phase) -> None:
        """The encoder phase trains E against a fixed G and D."""
        if phase.name not in ("gan", "encoder"):
            raise ValueError(f"fanogan has phases 'gan' and 'encoder', got {phase.name!r}")
        for module in (self.generator, self.critic):
            module.requires_grad_(phase.name == "gan")

    def sample_z(
        self, n: int, generator: torch.Generator | None, z: Tensor | None, device
    ) -> Tensor:
        D = self.cfg.section(FAnoGANConfig).latent_dim
        if z is None:
            z = torch.randn(n, D, generator=generator)
        elif z.shape != (n, D):
            raise ValueError(f"z must have shape {(n, D)}, got {tuple(z.shape)}")
        return z.to(device)

    def critic_loss(self, x: Tensor, z: Tensor, alpha: Tensor) -> Tensor:
        """WGAN-GP critic objective (Gulrajani et al. 2017, Alg. 1); x in [-1, 1]."""
        with torch.no_grad():
            fake = self.generator(z).to(x.dtype)
        inter = (x + alpha.view(-1, 1, 1, 1) * (fake - x)).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(inter).sum(), inter, create_graph=True)
        penalty = (grad.float().flatten(1).norm(dim=1) - 1).pow(2).mean()
        wasserstein = self.critic(fake).float().mean() - self.critic(x).float().mean()
        return wasserstein + self.cfg.section(FAnoGANConfig).gp_weight * penalty

    def encode(self, x: Tensor) -> Tensor:
        """x in [-1, 1] -> z = tanh(E(x)) (Schlegl's "tanh_fc")."""
        return torch.tanh(self.encoder(x))

    def izi_f(self, x: Tensor) -> Tensor:
        """Schlegl's izi_f loss for x in [-1, 1], G with running BatchNorm statistics."""
        with eval_mode(self.generator):
            rec = self.generator(self.encode(x))
        with torch.no_grad():
            target = self.critic.features(x).float()
        features = self.critic.features(rec).float()
        return F.mse_loss(rec.float(), x.float()) + self.cfg.section(
            FAnoGANConfig
        ).feature_weight * F.mse_loss(features, target)

    def loss(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        group: str = "model",
        z: Tensor | None = None,
        alpha: Tensor | None = None,
    ) -> Tensor:
        """x0: (B, 1, H, W) in [0, 1]; group "critic", "generator" or "encoder".
        z: (B, latent_dim) prior draws; alpha: (B,) interpolation weights of the penalty
        (both drawn from `generator` unless given)."""
        check_group(self, group)
        self.check_images(x0)
        x = x0 * 2 - 1
        if group == "encoder":
            return self.izi_f(x)
        z = self.sample_z(x.shape[0], generator, z, x.device)
        if group == "generator":
            return -self.critic(self.generator(z)).float().mean()
        if alpha is None:
            alpha = torch.rand(x.shape[0], generator=generator)
        return self.critic_loss(x, z, alpha.to(x.device, x.dtype))

    def validation_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.check_images(x0)
        return self.izi_f(x0 * 2 - 1)

    def compile_targets(self) -> list[nn.Module]:
        """The networks torch.compile may replace the forward of (device.speed_up): the
        generator and the encoder. Not the loss (the model's own forward), and not the
        critic: the gradient penalty differentiates through the critic twice
        (create_graph=True), and a compiled module's backward cannot be differentiated
        again ("torch.compile with aot_autograd does not currently support double
        backward", torch 2.13), which would fail at the first critic step."""
        return [self.generator, self.encoder]

    # ------------------------------------------------------------------ inference contract

    def reconstruct_batch(self, x: Tensor) -> Tensor:
        """G(E(x)) in [0, 1], encoder and generator with running BatchNorm statistics."""
        with eval_mode(self.encoder, self.generator):
            return (self.generator(self.encode(x * 2 - 1)) + 1) / 2


__all__ = ["DownNet", "FAnoGAN", "Generator", "ResBlock"]
