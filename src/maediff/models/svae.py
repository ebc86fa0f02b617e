"""SVAE (Behrendt et al. 2022): the slice VAE of AE/VAE whose latents see the other
slices of the same volume through a transformer encoder (docs/baselines.md).

    volumes (B, S, 1, H, W) -> encoder per slice -> mu, logvar (B, S, D)
      -> z = mu + sigma * eps -> z + Transformer(z + pos(slice index)) -> decoder per slice

Training batches are whole volumes (input_kind "volumes"); the loss is the VAE's
(reconstruction error summed over pixels + kl_weight * KL, per pixel), averaged over all
slices of the batch. reconstruct() gets all S slices of one volume and treats them as one
sequence with z = mu. Positions are sinusoidal in the slice index, so any S works.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, check_downsampling
from ..registry import Preset, check, register_section
from .autoencoders import (
    AutoencoderConfig,
    ConvAutoencoder,
    _describe_ae,
    check_group,
    dropout,
    kl_divergence,
    reconstruction_error,
    reparameterise,
)
from .base import AnomalyModel, Reconstruction, batched
from .register import register_model
from .unet import timestep_embedding


@dataclass(frozen=True)
class SVAEConfig:
    """Transformer over the slice latents of one volume (Behrendt et al. 2022)."""

    depth: int = 4  # transformer blocks
    heads: int = 8  # attention heads; must divide autoencoder.latent_dim
    mlp_ratio: float = 4.0  # hidden width of the block MLP / latent_dim
    dropout: float = 0.1  # on the residual branches while training

    def __post_init__(self) -> None:
        check(self.depth >= 1, f"svae.depth={self.depth} must be >= 1")
        check(self.heads >= 1, f"svae.heads={self.heads} must be >= 1")
        check(self.mlp_ratio > 0, f"svae.mlp_ratio={self.mlp_ratio} must be > 0")
        check(0 <= self.dropout < 1, f"svae.dropout={self.dropout} must be in [0, 1)")


register_section(
    "svae",
    SVAEConfig,
    cpu=lambda s: replace(s, depth=2, heads=4),
    tiny=lambda s: replace(s, depth=1, heads=2),
)


class Block(nn.Module):
    """Pre-norm transformer block over the slice axis: (B, S, D) -> (B, S, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, p_drop: float, generator: torch.Generator | None) -> Tensor:
        B, S, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, h, S, D/h) each
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D)
        x = x + dropout(self.proj(att), p_drop, generator)
        return x + dropout(self.mlp(self.norm2(x)), p_drop, generator)


class SliceContext(nn.Module):
    """z (B, S, D) -> z + W LN(Blocks(z + pos)): each slice latent corrected by the others."""

    def __init__(self, cfg: SVAEConfig, dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, z: Tensor, p_drop: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        S, D = z.shape[1:]
        h = z + timestep_embedding(torch.arange(S, device=z.device), D).to(z.dtype)
        for block in self.blocks:
            h = block(h, p_drop, generator)
        return z + self.out(self.norm(h))


def _check_svae(cfg: Config) -> None:
    a = cfg.section(AutoencoderConfig)
    check(
        a.latent_dim % cfg.section(SVAEConfig).heads == 0,
        f"svae.heads={cfg.section(SVAEConfig).heads} must divide autoencoder.latent_dim={a.latent_dim}",
    )
    check_downsampling(cfg, "autoencoder.channels", len(a.channels))


@register_model(
    "svae",
    sections=("autoencoder", "svae"),
    presets=(
        # a batch is whole volumes: 4 volumes of 50 slices = 200 slices per step
        Preset(
            "svae",
            "SVAE",
            lambda c: replace(c, train=replace(c.train, batch_size=4)),
            table=("1", 40),
        ),
    ),
    check=_check_svae,
    describe=_describe_ae,
)
class SVAE(AnomalyModel):
    input_kind = "volumes"
    description = "slice VAE with a transformer over the slices of a volume (Behrendt et al. 2022)"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.net = ConvAutoencoder(
            cfg.section(AutoencoderConfig), cfg.geometry.image_size, variational=True
        )
        self.context = SliceContext(
            cfg.section(SVAEConfig), cfg.section(AutoencoderConfig).latent_dim
        )

    def check_volumes(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(
                f"svae trains on whole volumes (B, S, 1, H, W) (input_kind 'volumes'), got shape "
                f"{tuple(x.shape)}: a batch of slices has no inter-slice context"
            )
        self.check_images(x)

    def objective(
        self, x0: Tensor, generator: torch.Generator | None, eps: Tensor | None, train: bool
    ) -> Tensor:
        """x0: (B, S, 1, H, W) -> the VAE loss per pixel, averaged over all B * S slices."""
        self.check_volumes(x0)
        a, B, S = self.cfg.section(AutoencoderConfig), x0.shape[0], x0.shape[1]
        x = x0.flatten(0, 1)  # (B S, 1, H, W)
        p = a.dropout if train else 0.0
        mu, logvar = self.net.encode(x)
        z = reparameterise(mu, logvar, generator, None if eps is None else eps.reshape(mu.shape))
        z = self.context(
            z.view(B, S, -1), self.cfg.section(SVAEConfig).dropout if train else 0.0, generator
        )
        rec = self.net.decode(z.flatten(0, 1), p, generator)
        per_slice = reconstruction_error(x, rec, a.loss)
        per_slice = per_slice + a.kl_weight * kl_divergence(mu.float(), logvar.float())
        return per_slice.mean() / x[0].numel()

    def loss(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        group: str = "model",
        eps: Tensor | None = None,
    ) -> Tensor:
        """x0: volumes (B, S, 1, H, W) in [0, 1]; eps: (B, S, latent_dim) or None (drawn)."""
        check_group(self, group)
        return self.objective(x0, generator, eps, train=True)

    def validation_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.objective(x0, generator, None, train=False)

    def compile_targets(self) -> list[nn.Module]:
        """The convolutional encoder and decoder; the slice transformer (dropout with a
        generator, one sequence per volume) stays eager."""
        return [self.net.encoder, self.net.decoder]

    def reconstruct_slices(self, slices: Tensor, run: Reconstruction) -> Tensor:
        """All S slices of one volume (S, 1, H, W) -> (S, 1, H, W): posterior means of every
        slice, the transformer over the whole sequence (slices without brain included:
        they are the context), then the decoder per slice with brain."""
        mu = [torch.zeros(0, self.cfg.section(AutoencoderConfig).latent_dim, device=run.device)]
        for b in batched(slices.shape[0], run.batch_size):
            with run.autocast():
                mu.append(self.net.encode(slices[b])[0].float())
        with run.autocast():
            z = self.context(torch.cat(mu)[None]).float()[0]  # (S, D)
        out = slices.clone()
        for idx in run.batches(torch.nonzero(run.has_brain).flatten()):
            with run.autocast():
                out[idx] = self.net.decode(z[idx]).float()
        return out


__all__ = ["SVAE", "SliceContext"]
