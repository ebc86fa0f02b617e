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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, SVAEConfig
from ..device import autocast_context, resolve_amp
from . import register_model
from .autoencoders import (
    ConvAutoencoder,
    check_group,
    dropout,
    kl_divergence,
    reconstruction_error,
    reparameterise,
)
from .base import AnomalyModel, batched
from .unet import timestep_embedding


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


@register_model("svae")
class SVAE(AnomalyModel):
    input_kind = "volumes"
    description = "slice VAE with a transformer over the slices of a volume (Behrendt et al. 2022)"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.net = ConvAutoencoder(cfg.autoencoder, cfg.geometry.image_size, variational=True)
        self.context = SliceContext(cfg.svae, cfg.autoencoder.latent_dim)

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
        a, B, S = self.cfg.autoencoder, x0.shape[0], x0.shape[1]
        x = x0.flatten(0, 1)  # (B S, 1, H, W)
        p = a.dropout if train else 0.0
        mu, logvar = self.net.encode(x)
        z = reparameterise(mu, logvar, generator, None if eps is None else eps.reshape(mu.shape))
        z = self.context(z.view(B, S, -1), self.cfg.svae.dropout if train else 0.0, generator)
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

    @torch.no_grad()
    def reconstruct(
        self,
        slices: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        batch_size: int | None = None,
        amp: str | None = None,
        progress: Callable[[int], None] | None = None,
        brain_mask: Tensor | None = None,
    ) -> Tensor:
        """All S slices of one volume (S, 1, H, W) -> (S, 1, H, W): posterior means of every
        slice, the transformer over the whole sequence, then the decoder per slice."""
        self.check_images(slices)
        if slices.dim() != 4:
            raise ValueError(
                f"reconstruct takes the slices of one volume (S, 1, H, W), got {tuple(slices.shape)}"
            )
        if noise is not None:
            raise ValueError("svae draws no noise at reconstruction; pass noise=None")
        dev, S = self.device, slices.shape[0]
        amp = resolve_amp(amp or self.cfg.inference.amp, dev)
        chunks = batched(S, batch_size or self.cfg.inference.batch_size)
        mu = [torch.zeros(0, self.cfg.autoencoder.latent_dim, device=dev)]
        for b in chunks:
            with autocast_context(dev, amp):
                mu.append(self.net.encode(slices[b].to(dev, torch.float32))[0].float())
        with autocast_context(dev, amp):
            z = self.context(torch.cat(mu)[None]).float()[0]  # (S, D)
        out = [torch.zeros(0, *slices.shape[1:], device=dev)]
        for b in chunks:
            with autocast_context(dev, amp):
                out.append(self.net.decode(z[b]).float().clamp(0, 1))
            if progress is not None:
                progress(b.stop - b.start)
        return torch.cat(out)


__all__ = ["SVAE", "SliceContext"]
