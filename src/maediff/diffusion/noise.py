"""Noise for the forward process: Gaussian and multi-octave 2-D simplex noise.

Simplex noise is the 2-D OpenSimplex algorithm (K. Spencer), vectorised in torch:
every pixel of every field of every octave is evaluated by the same handful of
tensor operations, with no per-pixel Python loop. Randomness enters only through
an explicit `torch.Generator` (a lattice permutation per field).

Fields are computed on the device they are asked for (`device=`), where the model
runs: only the lattice permutations are drawn on the CPU, from the CPU generator, so a
seed gives the same fields on every device (up to float rounding) and the per-pixel
work runs on the GPU. Gaussian noise is drawn on the CPU for the same reason.

Octaves follow AnoDDPM / pDDPM (docs/method.md §Noise): the coordinates of octave k are
`pixel * frequency * 2**k`, the amplitude is `persistence**k`, summed.

    sampler = NoiseSampler(cfg.noise, (96, 96))
    eps = sampler(32, generator=g)          # (32, 1, 96, 96), one field per sample
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..device import to_device
from ..registry import check, register_section


@dataclass(frozen=True)
class NoiseConfig:
    """Noise of the forward process (paper Alg. 1, docs/method.md §Noise)."""

    kind: str = "simplex"  # "simplex" or "gaussian"
    octaves: int = 6
    persistence: float = 0.8
    frequency: float = 2.0**-6  # base frequency; doubled each octave
    # Scale each field to zero mean and unit std. The reference sums the octaves
    # without normalising (std about 0.5-0.6); False keeps that noise level.
    normalise: bool = False
    # beyond the paper: subtract each field's own spatial mean (no rescaling), so that
    # no slice-wide offset is shared by every patch of a slice (docs/method.md §Noise)
    zero_mean: bool = False
    # Reference parity: one field drawn per call and repeated over the batch.
    shared: bool = False
    # 0: draw fresh fields every call. >0: a seeded bank of that many fields, each
    # use taking a random one with a random flip, 90-degree rotation and roll.
    bank_size: int = 0

    def __post_init__(self) -> None:
        check(
            self.kind in ("simplex", "gaussian"),
            f"noise.kind={self.kind!r} must be 'simplex' or 'gaussian'",
        )
        check(self.octaves >= 1, f"noise.octaves={self.octaves} must be >= 1")
        check(self.frequency > 0, f"noise.frequency={self.frequency} must be > 0")
        check(self.bank_size >= 0, f"noise.bank_size={self.bank_size} must be >= 0")


register_section(
    "noise",
    NoiseConfig,
    # 48x48 slices of the protocol's 96x96: double the per-pixel frequency so the
    # noise keeps the physical scale of the paper's 2^-6 at 96x96
    cpu=lambda n: replace(n, frequency=2.0 * n.frequency),
)

# OpenSimplex 2-D constants
STRETCH_2D = (1.0 / math.sqrt(3.0) - 1.0) / 2.0  # -0.2113...
SQUISH_2D = (math.sqrt(3.0) - 1.0) / 2.0  # 0.3660...
NORM_2D = 47.0
# 8 gradients, indexed by (perm value & 0x0E) / 2
GRADIENTS_2D = (
    (5.0, 2.0),
    (2.0, 5.0),
    (-5.0, 2.0),
    (-2.0, 5.0),
    (5.0, -2.0),
    (2.0, -5.0),
    (-5.0, -2.0),
    (-2.0, -5.0),
)


def random_permutations(n: int, generator: torch.Generator | None) -> Tensor:
    """n independent permutations of 0..255 drawn from `generator`: (n, 256) long."""
    return torch.stack([torch.randperm(256, generator=generator) for _ in range(n)])


def _contribution(
    perm: Tensor, grad: Tensor, xsb: Tensor, ysb: Tensor, dx: Tensor, dy: Tensor
) -> Tensor:
    """attn^4 * <gradient(lattice point), offset> for each point; 0 outside the kernel radius.

    perm: (B, 256) long; xsb, ysb: (P,) or (B, P) long lattice coordinates; dx, dy float.
    """
    B = perm.shape[0]
    xi = (xsb & 0xFF).expand(B, -1)
    inner = torch.gather(perm, 1, xi)
    idx = torch.gather(perm, 1, (inner + ysb) & 0xFF)
    g = grad[(idx & 0x0E) >> 1]  # (B, P, 2)
    attn = (2.0 - dx * dx - dy * dy).clamp_min(0.0)
    attn = attn * attn
    return attn * attn * (g[..., 0] * dx + g[..., 1] * dy)


def opensimplex2(x: Tensor, y: Tensor, perm: Tensor) -> Tensor:
    """2-D OpenSimplex noise at points (x, y) for each permutation.

    x, y: (P,) coordinates; perm: (B, 256) long -> (B, P) values in about [-1, 1].
    """
    grad = torch.tensor(GRADIENTS_2D, dtype=x.dtype, device=x.device)
    stretch = (x + y) * STRETCH_2D
    xs, ys = x + stretch, y + stretch
    xsb, ysb = torch.floor(xs), torch.floor(ys)
    squish = (xsb + ysb) * SQUISH_2D
    dx0, dy0 = x - (xsb + squish), y - (ysb + squish)
    xins, yins = xs - xsb, ys - ysb
    in_sum = xins + yins
    xsb, ysb = xsb.long(), ysb.long()

    # contributions of the lattice points (1, 0) and (0, 1)
    value = _contribution(perm, grad, xsb + 1, ysb, dx0 - 1 - SQUISH_2D, dy0 - SQUISH_2D)
    value = value + _contribution(perm, grad, xsb, ysb + 1, dx0 - SQUISH_2D, dy0 - 1 - SQUISH_2D)

    low = in_sum <= 1  # inside the triangle at (0, 0), else at (1, 1)
    x_gt_y = xins > yins
    # extra vertex, lower triangle
    zin_lo = 1 - in_sum
    lo_near0 = (zin_lo > xins) | (zin_lo > yins)
    ext_lo_x = torch.where(lo_near0, torch.where(x_gt_y, xsb + 1, xsb - 1), xsb + 1)
    ext_lo_y = torch.where(lo_near0, torch.where(x_gt_y, ysb - 1, ysb + 1), ysb + 1)
    dext_lo_x = torch.where(
        lo_near0, torch.where(x_gt_y, dx0 - 1, dx0 + 1), dx0 - 1 - 2 * SQUISH_2D
    )
    dext_lo_y = torch.where(
        lo_near0, torch.where(x_gt_y, dy0 + 1, dy0 - 1), dy0 - 1 - 2 * SQUISH_2D
    )
    # extra vertex, upper triangle
    zin_hi = 2 - in_sum
    hi_near0 = (zin_hi < xins) | (zin_hi < yins)
    ext_hi_x = torch.where(hi_near0, torch.where(x_gt_y, xsb + 2, xsb), xsb)
    ext_hi_y = torch.where(hi_near0, torch.where(x_gt_y, ysb, ysb + 2), ysb)
    dext_hi_x = torch.where(
        hi_near0, torch.where(x_gt_y, dx0 - 2 - 2 * SQUISH_2D, dx0 - 2 * SQUISH_2D), dx0
    )
    dext_hi_y = torch.where(
        hi_near0, torch.where(x_gt_y, dy0 - 2 * SQUISH_2D, dy0 - 2 - 2 * SQUISH_2D), dy0
    )

    ext_x, ext_y = torch.where(low, ext_lo_x, ext_hi_x), torch.where(low, ext_lo_y, ext_hi_y)
    dext_x, dext_y = torch.where(low, dext_lo_x, dext_hi_x), torch.where(low, dext_lo_y, dext_hi_y)
    # base vertex: (0, 0) in the lower triangle, (1, 1) in the upper one
    base_x, base_y = torch.where(low, xsb, xsb + 1), torch.where(low, ysb, ysb + 1)
    d0x = torch.where(low, dx0, dx0 - 1 - 2 * SQUISH_2D)
    d0y = torch.where(low, dy0, dy0 - 1 - 2 * SQUISH_2D)

    value = value + _contribution(perm, grad, base_x, base_y, d0x, d0y)
    value = value + _contribution(perm, grad, ext_x, ext_y, dext_x, dext_y)
    return value / NORM_2D


def simplex_octaves(
    perm: Tensor,
    size: tuple[int, int],
    octaves: int = 6,
    persistence: float = 0.8,
    frequency: float = 2.0**-6,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sum of `octaves` OpenSimplex octaves on an (H, W) pixel grid, one field per perm.

    perm: (B, 256) long -> (B, H, W). Pixel (i, j) of octave k is evaluated at
    x = j * frequency * 2**k, y = i * frequency * 2**k with amplitude persistence**k.
    All octaves are evaluated in one vectorised pass.
    """
    H, W = size
    dev = perm.device
    freqs = frequency * (2.0 ** torch.arange(octaves, dtype=dtype, device=dev))  # (O,)
    amps = persistence ** torch.arange(octaves, dtype=dtype, device=dev)
    xs = torch.arange(W, dtype=dtype, device=dev)
    ys = torch.arange(H, dtype=dtype, device=dev)
    x = (freqs[:, None, None] * xs[None, None, :]).expand(octaves, H, W).reshape(-1)
    y = (freqs[:, None, None] * ys[None, :, None]).expand(octaves, H, W).reshape(-1)
    vals = opensimplex2(x, y, perm).view(-1, octaves, H, W)
    # a weighted sum, not an einsum: on CUDA an einsum is a matmul, in TF32 there
    # (device.speed_up), and the GPU's noise would differ from the CPU's by 1e-3
    return (vals * amps[:, None, None]).sum(1)


def _standardise(fields: Tensor) -> Tensor:
    """Zero mean, unit std per field: (B, 1, H, W)."""
    mean = fields.mean(dim=(-2, -1), keepdim=True)
    std = fields.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (fields - mean) / std


class NoiseSampler:
    """Draws noise fields (B, 1, H, W) as configured by a `NoiseConfig`.

    - kind "gaussian": i.i.d. N(0, 1).
    - kind "simplex": one multi-octave simplex field per sample from its own random
      permutation; `normalise` scales each field to zero mean and unit std;
      `shared` (reference parity) draws one field and repeats it over the batch.
    - bank_size > 0: a bank of simplex fields of size (2H, 2W) is precomputed once from
      the generator; each sample then takes a random bank field, a random (H, W)
      window of it, a random flip and, for square fields, a random 90-degree rotation.
      This trades exact freshness (the bank has bank_size * (H+1)(W+1) * 8 distinct
      fields) for speed; off by default.
    """

    def __init__(self, cfg: NoiseConfig, size: tuple[int, int]):
        self.cfg = cfg
        self.size = (int(size[0]), int(size[1]))
        self._bank: Tensor | None = None

    def simplex(
        self,
        n: int,
        generator: torch.Generator | None,
        size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """n fields (n, 1, H, W) computed on `device`: the permutations are drawn on the
        CPU from `generator` and only their (n, 256) table is moved there."""
        perm = random_permutations(n, generator)
        perm = to_device(perm, torch.device(device)) if device is not None else perm
        c = self.cfg
        f = simplex_octaves(perm, size or self.size, c.octaves, c.persistence, c.frequency)
        return f.unsqueeze(1)

    def _from_bank(
        self, n: int, generator: torch.Generator | None, device: torch.device | None = None
    ) -> Tensor:
        H, W = self.size
        if self._bank is None:
            self._bank = self.simplex(self.cfg.bank_size, generator, (2 * H, 2 * W), device)
        bank = self._bank.to(device)
        pick = torch.randint(len(bank), (n,), generator=generator)
        top = torch.randint(H + 1, (n,), generator=generator)
        left = torch.randint(W + 1, (n,), generator=generator)
        flips = torch.randint(2, (n, 2), generator=generator)
        rots = torch.randint(4 if H == W else 1, (n,), generator=generator)
        out = []
        for i in range(n):
            f = bank[pick[i], :, top[i] : top[i] + H, left[i] : left[i] + W]
            dims = [d for d, flag in zip((-2, -1), flips[i].tolist()) if flag]
            if dims:
                f = f.flip(dims)
            out.append(torch.rot90(f, int(rots[i]), dims=(-2, -1)))
        return torch.stack(out)

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """n fields (n, 1, H, W) on `device` (default: the CPU) in `dtype`."""
        c = self.cfg
        H, W = self.size
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if c.kind == "gaussian":  # the CPU generator's draws, as on every device
            fields = torch.randn((1 if c.shared else n, 1, H, W), generator=generator)
        elif c.bank_size > 0:
            fields = self._from_bank(1 if c.shared else n, generator, dev)
        else:
            fields = self.simplex(1 if c.shared else n, generator, device=dev)
        if c.normalise and c.kind == "simplex":
            fields = _standardise(fields)
        elif c.zero_mean:
            fields = fields - fields.mean(dim=(-2, -1), keepdim=True)
        if c.shared:
            fields = fields.expand(n, 1, H, W)
        return to_device(fields, dev).to(dtype)


__all__ = ["NoiseSampler", "opensimplex2", "random_permutations", "simplex_octaves"]
