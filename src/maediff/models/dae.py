"""DAE (Kascenas et al. 2022): a U-Net trained to remove coarse noise from healthy
slices; the reconstruction is one pass on the clean input (docs/baselines.md).

    noise: N(0, noise_std^2) at noise_res x noise_res -> bilinear to H x W -> random roll
    x~ = x + noise * [x > 0]                      (noise only on the brain foreground)
    loss = mean over pixels of [x > 0] * (U(x~) - x)^2
    rec = U(x)

The U-Net is Kascenas's plain one (not the diffusion U-Net): per level two 3x3 weight-
standardised convolutions (reflection padding), each followed by SiLU ("swish") and
GroupNorm; 2x2 average pooling down; 2x2 transposed convolution up, concatenation with
the skip and the same two-conv block; a 1x1 output convolution, no activation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, check_downsampling, check_widths, describe_size
from ..device import to_device
from ..registry import Preset, check, register_section
from .autoencoders import check_group
from .base import AnomalyModel
from .register import register_model


@dataclass(frozen=True)
class DAEConfig:
    """Denoising U-Net with coarse noise (Kascenas et al. 2022)."""

    noise_res: int = 16  # Gaussian noise drawn at noise_res x noise_res, upsampled
    noise_std: float = 0.2  # std of that noise (intensities in [0, 1])
    # U-Net widths per level (Kascenas: depth 4, first width 2^6 = 64, doubling)
    channels: tuple[int, ...] = (64, 128, 256, 512)

    def __post_init__(self) -> None:
        check_widths("dae.channels", self.channels)
        check(self.noise_res >= 1, f"dae.noise_res={self.noise_res} must be >= 1")
        check(self.noise_std >= 0, f"dae.noise_std={self.noise_std} must be >= 0")


register_section(
    "dae",
    DAEConfig,
    # the same noise cell size in pixels (6) as 16 cells at 96x96
    cpu=lambda d: replace(d, noise_res=d.noise_res // 2, channels=(8, 16, 32, 64)),
    tiny=lambda d: replace(d, noise_res=4, channels=(8, 16, 32)),
)


def middle_divisor_groups(channels: int) -> int:
    """GroupNorm groups as Kascenas choose them: the middle divisor of the width."""
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    return divisors[len(divisors) // 2]


class WSConv2d(nn.Conv2d):
    """Convolution with weight standardisation (zero mean, unit std per output filter)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers += [
            nn.ReflectionPad2d(1),
            WSConv2d(c, c_out, 3),
            nn.SiLU(),
            nn.GroupNorm(middle_divisor_groups(c_out), c_out),
        ]
    return nn.Sequential(*layers)


class PlainUNet(nn.Module):
    """(B, 1, H, W) -> (B, 1, H, W); widths per level `channels`, H divisible by 2^(L-1)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        ins = (1, *channels[:-1])
        self.down = nn.ModuleList(conv_block(i, o) for i, o in zip(ins, channels))
        levels = range(len(channels) - 2, -1, -1)  # from the deepest skip up
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in levels
        )
        self.merge = nn.ModuleList(conv_block(2 * channels[i], channels[i]) for i in levels)
        self.out = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


def _check_dae(cfg: Config) -> None:
    H = cfg.geometry.image_size
    check(
        cfg.section(DAEConfig).noise_res <= H,
        f"dae.noise_res={cfg.section(DAEConfig).noise_res} must be in 1..image_size ({H})",
    )
    check_downsampling(cfg, "dae.channels", len(cfg.section(DAEConfig).channels) - 1)


def _describe_dae(cfg: Config) -> str:
    d = cfg.section(DAEConfig)
    return (
        f"{describe_size(cfg)}, U-Net {list(d.channels)}, "
        f"coarse noise {d.noise_res}x{d.noise_res} std {d.noise_std}"
    )


@register_model(
    "dae",
    sections=("dae",),
    presets=(
        # Kascenas et al.: Adam with weight decay 1e-5 (their AMSGrad variant is not offered)
        Preset(
            "dae",
            "DAE",
            lambda c: replace(c, train=replace(c.train, weight_decay=1e-5)),
            table=("1", 50),
        ),
    ),
    check=_check_dae,
    describe=_describe_dae,
)
class DAE(AnomalyModel):
    description = "denoising U-Net with coarse Gaussian noise (Kascenas et al. 2022)"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.net = PlainUNet(cfg.section(DAEConfig).channels)

    def coarse_noise(self, n: int, generator: torch.Generator | None) -> Tensor:
        """(n, 1, H, W): noise_res^2 Gaussian values, bilinearly upsampled, rolled by a
        random offset per image (all draws on the CPU from `generator`)."""
        d, H = self.cfg.section(DAEConfig), self.cfg.geometry.image_size
        low = torch.randn(n, 1, d.noise_res, d.noise_res, generator=generator) * d.noise_std
        noise = F.interpolate(low, size=(H, H), mode="bilinear", align_corners=True)
        shifts = torch.randint(H, (n, 2), generator=generator).tolist()
        return torch.stack([torch.roll(f, s, dims=(-2, -1)) for f, s in zip(noise, shifts)])

    def loss(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        group: str = "model",
        noise: Tensor | None = None,
    ) -> Tensor:
        """x0: (B, 1, H, W) in [0, 1]; noise: (B, 1, H, W) before masking, drawn unless given."""
        check_group(self, group)
        self.check_images(x0)
        if noise is None:
            noise = self.coarse_noise(x0.shape[0], generator)
        elif noise.shape != x0.shape:
            raise ValueError(
                f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}"
            )
        mask = (x0 > 0).to(x0.dtype)
        noise = to_device(noise, x0.device).to(x0.dtype)  # drawn on the CPU: without blocking
        pred = self.net(x0 + noise * mask)
        return ((pred.float() - x0).pow(2) * mask).mean()

    def validation_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.loss(x0, generator)

    def reconstruct_batch(self, x: Tensor) -> Tensor:
        """U(x): one pass on the clean slices."""
        return self.net(x)


__all__ = ["DAE", "PlainUNet"]
