"""AE and VAE (Baur et al. 2021, the comparative study's dense models) and the
convolutional encoder/decoder they share with SVAE (docs/baselines.md).

    x: (B, 1, H, W) -> encoder -> (B, F) -> dense -> z: (B, D) -> dense -> decoder -> (B, 1, H, W)

Encoder: per width c of `autoencoder.channels` a k x k convolution of stride 2, GroupNorm,
LeakyReLU; then a 1x1 convolution to C/8 channels (C = last width) and a flatten,
F = C/8 * (H / 2^L)^2. Decoder: dense to F, 1x1 convolution back to C, GroupNorm, ReLU,
then per stage a k x k transposed convolution of stride 2 (widths: the encoder's in
reverse, shifted by one stage, ending at channels[0]), GroupNorm, LeakyReLU, and a 1x1
convolution to one channel with no activation (reconstruct keeps its output as it is
unless inference.clamp).

Objective per image (Baur): the reconstruction error summed over pixels (l1 or l2)
+ kl_weight * KL(q(z|x) || N(0, I)) for the VAE, divided by the pixel count. Dropout on
the dense bottleneck (z and the dense output) while training, masks drawn from the
generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..config import Config, check_downsampling, check_widths, describe_size
from ..registry import Preset, check, register_section
from .base import AnomalyModel
from .register import register_model


@dataclass(frozen=True)
class AutoencoderConfig:
    """Convolutional encoder-decoder with a dense bottleneck: AE and VAE (Baur et al.
    2021), and the slice VAE inside SVAE (Behrendt et al. 2022). docs/baselines.md."""

    # widths of the stride-2 stages; Baur's unified encoder: min(128, 32 * 2^i), 4 stages
    channels: tuple[int, ...] = (32, 64, 128, 128)
    kernel_size: int = 5  # of the stride-2 (transposed) convolutions (Baur: 5)
    latent_dim: int = 128  # z (Baur's dense models: zDim = 128)
    loss: str = "l1"  # reconstruction loss: "l1" (Baur) or "l2"
    # VAE / SVAE: weight of KL(q(z|x) || N(0, I)) against the reconstruction error summed
    # over pixels (1.0 = Baur's objective; the loss is then divided by the pixel count)
    kl_weight: float = 1.0
    dropout: float = 0.2  # on the dense bottleneck while training (Baur: 0.2)

    def __post_init__(self) -> None:
        check_widths("autoencoder.channels", self.channels)
        check(
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            f"autoencoder.kernel_size={self.kernel_size} must be odd and >= 1",
        )
        check(self.latent_dim >= 1, f"autoencoder.latent_dim={self.latent_dim} must be >= 1")
        check(self.loss in ("l1", "l2"), f"autoencoder.loss={self.loss!r} must be 'l1' or 'l2'")
        check(self.kl_weight >= 0, f"autoencoder.kl_weight={self.kl_weight} must be >= 0")
        check(0 <= self.dropout < 1, f"autoencoder.dropout={self.dropout} must be in [0, 1)")


register_section(
    "autoencoder",
    AutoencoderConfig,
    cpu=lambda a: replace(a, channels=(16, 32, 64, 64), latent_dim=64),
    tiny=lambda a: replace(a, channels=(8, 16, 32), latent_dim=32),
)

LEAKY_SLOPE = 0.3  # tf.keras LeakyReLU default, which Baur's layers use


# --------------------------------------------------------------------------- helpers


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups: batch-independent, the same in train and eval mode."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


def dropout(h: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout with a mask drawn (on the CPU) from `generator`."""
    if p == 0:
        return h
    keep = torch.rand(h.shape, generator=generator) >= p
    return h * keep.to(h.device, h.dtype) / (1 - p)


def reparameterise(
    mu: Tensor, logvar: Tensor, generator: torch.Generator | None, eps: Tensor | None = None
) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I) from `generator` unless given (same shape as mu)."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator)
    elif eps.shape != mu.shape:
        raise ValueError(f"eps must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
    return mu + torch.exp(0.5 * logvar) * eps.to(mu.device, mu.dtype)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last axis: (..., D) -> (...)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1)


def reconstruction_error(x: Tensor, rec: Tensor, kind: str) -> Tensor:
    """Per-image error summed over pixels: (B, 1, H, W) x 2 -> (B,)."""
    diff = x - rec.float()
    err = diff.abs() if kind == "l1" else diff.pow(2)
    return err.flatten(1).sum(1)


def check_group(model: AnomalyModel, group: str) -> None:
    groups = model.optimizer_groups()
    if group not in groups:
        raise ValueError(
            f"{model.registry_name} has no optimizer group {group!r}; use one of {sorted(groups)}"
        )


# --------------------------------------------------------------------------- networks


class ConvAutoencoder(nn.Module):
    """Baur's dense-bottleneck autoencoder; `variational` doubles the latent head into
    (mu, logvar)."""

    def __init__(self, cfg: AutoencoderConfig, image_size: int, variational: bool):
        super().__init__()
        chs, k = cfg.channels, cfg.kernel_size
        self.squeeze = max(1, chs[-1] // 8)  # channels of the flattened map (Baur: C/8)
        self.grid = image_size // 2 ** len(chs)  # side of the flattened map
        features = self.squeeze * self.grid**2
        self.variational, self.latent_dim = variational, cfg.latent_dim

        layers: list[nn.Module] = []
        c_in = 1
        for c in chs:
            layers += [nn.Conv2d(c_in, c, k, 2, k // 2), group_norm(c), nn.LeakyReLU(LEAKY_SLOPE)]
            c_in = c
        self.encoder = nn.Sequential(*layers, nn.Conv2d(c_in, self.squeeze, 1), nn.Flatten())
        self.to_latent = nn.Linear(features, cfg.latent_dim * (2 if variational else 1))
        self.from_latent = nn.Linear(cfg.latent_dim, features)

        layers = [nn.Conv2d(self.squeeze, c_in, 1), group_norm(c_in), nn.ReLU()]
        for c in (*chs[::-1][1:], chs[0]):
            layers += [
                nn.ConvTranspose2d(c_in, c, k, 2, k // 2, output_padding=1),
                group_norm(c),
                nn.LeakyReLU(LEAKY_SLOPE),
            ]
            c_in = c
        self.decoder = nn.Sequential(*layers, nn.Conv2d(c_in, 1, 1))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, 1, H, W) -> mu (B, D) and logvar (B, D) (None for the plain AE)."""
        h = self.to_latent(self.encoder(x))
        if not self.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(
        self, z: Tensor, p_drop: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, D) -> (B, 1, H, W), unbounded; dropout p_drop on z and on the dense output."""
        h = self.from_latent(dropout(z, p_drop, generator))
        h = dropout(h, p_drop, generator).view(-1, self.squeeze, self.grid, self.grid)
        return self.decoder(h)


# --------------------------------------------------------------------------- models


def _describe_ae(cfg: Config) -> str:
    a = cfg.section(AutoencoderConfig)
    return f"{describe_size(cfg)}, conv {list(a.channels)}, z={a.latent_dim}"


def check_autoencoder(cfg: Config) -> None:
    check_downsampling(cfg, "autoencoder.channels", len(cfg.section(AutoencoderConfig).channels))


@register_model(
    "ae",
    sections=("autoencoder",),
    presets=(Preset("ae", "AE", table=("1", 20)),),
    check=check_autoencoder,
    describe=_describe_ae,
)
class AE(AnomalyModel):
    """Dense-bottleneck autoencoder (Baur et al. 2021): anomaly map = |x - D(E(x))|."""

    description = "dense convolutional autoencoder (Baur et al. 2021)"
    variational = False

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.net = ConvAutoencoder(
            cfg.section(AutoencoderConfig), cfg.geometry.image_size, self.variational
        )

    def objective(
        self, x0: Tensor, generator: torch.Generator | None, eps: Tensor | None, train: bool
    ) -> Tensor:
        """Baur's loss, per pixel; `train` switches the bottleneck dropout on."""
        self.check_images(x0)
        a = self.cfg.section(AutoencoderConfig)
        mu, logvar = self.net.encode(x0)
        z = mu if logvar is None else reparameterise(mu, logvar, generator, eps)
        rec = self.net.decode(z, a.dropout if train else 0.0, generator)
        per_image = reconstruction_error(x0, rec, a.loss)
        if logvar is not None:
            per_image = per_image + a.kl_weight * kl_divergence(mu.float(), logvar.float())
        return per_image.mean() / x0[0].numel()

    def loss(
        self, x0: Tensor, generator: torch.Generator | None = None, group: str = "model"
    ) -> Tensor:
        """x0: (B, 1, H, W) in [0, 1] -> scalar training loss."""
        check_group(self, group)
        return self.objective(x0, generator, None, train=True)

    def validation_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.objective(x0, generator, None, train=False)

    def reconstruct_batch(self, x: Tensor) -> Tensor:
        """D(E(x)) with z = the encoder's output (the posterior mean for the VAE)."""
        return self.net.decode(self.net.encode(x)[0])

    def compile_targets(self) -> list[nn.Module]:
        """The convolutional encoder and decoder (the dense layers and the dropout with
        its generator stay eager)."""
        return [self.net.encoder, self.net.decoder]


@register_model(
    "vae",
    sections=("autoencoder",),
    presets=(Preset("vae", "VAE", table=("1", 30)),),
    check=check_autoencoder,
    describe=_describe_ae,
)
class VAE(AE):
    """Dense-bottleneck VAE (Baur et al. 2021): trained with the reparameterisation trick,
    reconstructs from the posterior mean."""

    description = "dense convolutional variational autoencoder (Baur et al. 2021)"
    variational = True

    def loss(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        group: str = "model",
        eps: Tensor | None = None,
    ) -> Tensor:
        """eps: (B, latent_dim) standard normal draws, from `generator` unless given."""
        check_group(self, group)
        return self.objective(x0, generator, eps, train=True)


__all__ = [
    "AE",
    "VAE",
    "ConvAutoencoder",
    "dropout",
    "group_norm",
    "kl_divergence",
    "reparameterise",
]
