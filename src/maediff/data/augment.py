"""Intensity augmentation of training slices, for models that must hold up on scans
from another site (beyond the paper; docs/method.md §Site robustness).

    x = augment_intensity(x, cfg.augment, generator)     # (B, 1, H, W) in [0, 1]

Each transform is drawn per sample with probability `cfg.probability`, in this order,
as an acquisition would produce it: a random monotone intensity curve (tissue
contrast), gamma, a smooth multiplicative bias field, blur (resolution), Gaussian
noise. Only brain pixels (> 0) change; the result is clipped to [0, 1]. The patch
model inpaints from the visible context, so training on varied contrasts teaches it
to inpaint in the contrast the context shows instead of the training site's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import AugmentConfig

CURVE_KNOTS = 6  # knots of the random intensity curve, evenly spaced on [0, 1]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_curve(x: Tensor, strength: float, g: torch.Generator | None) -> Tensor:
    """Monotone piecewise-linear map of [0, 1] onto itself per sample: the segment slopes
    are exp(N(0, strength)), normalised so that 0 -> 0 and 1 -> 1."""
    B = x.shape[0]
    slopes = torch.exp(strength * torch.randn(B, CURVE_KNOTS - 1, generator=g))
    knots = torch.cat([torch.zeros(B, 1), torch.cumsum(slopes, 1)], 1)
    knots = (knots / knots[:, -1:]).to(x.device, x.dtype)  # (B, K)
    pos = x.clamp(0, 1) * (CURVE_KNOTS - 1)
    i = pos.floor().clamp(max=CURVE_KNOTS - 2).long()
    frac = pos - i
    flat = i.flatten(1)
    lo = torch.gather(knots, 1, flat).view_as(x)
    hi = torch.gather(knots, 1, flat + 1).view_as(x)
    return lo + frac * (hi - lo)


def bias_field(shape: tuple[int, ...], strength: float, g: torch.Generator | None) -> Tensor:
    """exp of a smooth field: N(0, strength) on 3x3 control points, bicubic-upsampled."""
    B, _, H, W = shape
    coarse = strength * torch.randn(B, 1, 3, 3, generator=g)
    return torch.exp(F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=True))


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma (pixels) per sample; sigma 0 is identity."""
    B = x.shape[0]
    radius = max(1, int(torch.ceil(3 * sigma.max()).item()))
    r = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (r[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1)
    h = x.transpose(0, 1)  # (1, B, H, W): one group per sample
    h = F.conv2d(F.pad(h, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=B)
    h = F.conv2d(F.pad(h, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=B)
    return h.transpose(0, 1)


def augment_intensity(x: Tensor, cfg: AugmentConfig, g: torch.Generator | None = None) -> Tensor:
    """Augmented copy of a batch of slices (B, 1, H, W) in [0, 1]; see the module doc."""
    if x.dim() != 4:
        raise ValueError(f"augment_intensity takes (B, 1, H, W) slices, got {tuple(x.shape)}")
    B = x.shape[0]
    brain = (x > 0).to(x.dtype)
    p = cfg.probability

    def chosen() -> Tensor:
        return (torch.rand(B, generator=g) < p).to(x.device)[:, None, None, None]

    out = x
    if cfg.contrast > 0:
        out = torch.where(chosen(), random_curve(out, cfg.contrast, g), out)
    lo, hi = torch.log(torch.tensor(cfg.gamma, dtype=torch.float64))
    gamma = torch.exp(_uniform(B, float(lo), float(hi), g)).to(x.device, x.dtype)
    out = torch.where(chosen(), out.clamp(min=0) ** gamma[:, None, None, None], out)
    if cfg.bias_field > 0:
        field = bias_field(tuple(x.shape), cfg.bias_field, g).to(x.device, x.dtype)
        out = torch.where(chosen(), out * field, out)
    sigma = _uniform(B, *cfg.blur_sigma, g) * chosen().flatten().cpu()
    if float(sigma.max()) > 0:
        # blur the brain and its mask together so the edge is not darkened
        out = gaussian_blur(out * brain, sigma) / gaussian_blur(brain, sigma).clamp(min=1e-3)
    std = _uniform(B, *cfg.noise_std, g) * chosen().flatten().cpu()
    noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    out = out + std.to(x.device, x.dtype)[:, None, None, None] * noise
    return (out.clamp(0, 1) * brain).to(x.dtype)


__all__ = ["augment_intensity", "bias_field", "gaussian_blur", "random_curve"]
