"""The diffusion U-Net of pDDPM (ADM style, Dhariwal & Nichol 2021), optionally with
the MAE module of paper §3.3 between the encoder and the bottleneck.

    x: (B, 1, H, W), t: (B,) -> x0 estimate (B, 1, H, W)

Architecture (docs/method.md §Networks): a 3x3 input conv, then per level `num_res_blocks`
residual blocks (scale-shift time conditioning, GroupNorm, zero-initialised output
convs) and a down-sampling residual block; the middle block is ResBlock ->
self-attention -> ResBlock; the decoder mirrors the encoder with skip connections and
up-sampling residual blocks. Global self-attention is added after the residual blocks
of the levels listed in `attention_levels` (Table 2 "Att.").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GeometryConfig
from ..registry import check, register_section
from .mae import MAE, MAEConfig


@dataclass(frozen=True)
class UNetConfig:
    """pDDPM / ADM diffusion U-Net (docs/method.md §Networks)."""

    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 3
    # Global self-attention in encoder and decoder at these downsampling factors
    # (1 = full resolution, 2 = H/2, 4 = H/4). The middle block always has one.
    attention_levels: tuple[int, ...] = (2, 4)  # Table 2 "Att." (the published MAEDiff)
    num_head_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    # Feed the visible region x^_0 and the patch mask as two extra input channels
    # (paper Eq. 8-9 leave this open; off = the noised image alone, docs/method.md §Networks).
    condition_channels: bool = False
    # width of each up-sampling residual block: "same" (ADM, pDDPM: the coarser level's)
    # or "next" (the finer level's, which the blocks after it have anyway); at the `cpu`
    # scale "same" puts a third of the FLOPs into one block at H/2 -> H
    up_width: str = "same"

    def __post_init__(self) -> None:
        check(
            self.up_width in ("same", "next"),
            f"unet.up_width={self.up_width!r} must be 'same' or 'next'",
        )
        check(
            self.model_channels > 0 and len(self.channel_mult) > 0,
            f"unet.channel_mult={self.channel_mult!r} must be non-empty",
        )
        levels = {2**i for i in range(len(self.channel_mult))}
        # attention runs at the listed levels and in the middle block (the deepest level)
        attended = {len(self.channel_mult) - 1} | {
            i for i in range(len(self.channel_mult)) if 2**i in self.attention_levels
        }
        for i, w in enumerate(self.model_channels * k for k in self.channel_mult):
            check(
                w % self.norm_groups == 0,
                f"unet.norm_groups={self.norm_groups} does not divide channel width {w}",
            )
            check(
                i not in attended or w % self.num_head_channels == 0,
                f"unet.num_head_channels={self.num_head_channels} does not divide channel width {w} (attention at level {2**i})",
            )
        for a in self.attention_levels:
            check(
                a in levels,
                f"unet.attention_levels entry {a} is not one of the U-Net's downsampling factors {sorted(levels)}",
            )
        check(self.num_res_blocks >= 1, f"unet.num_res_blocks={self.num_res_blocks} must be >= 1")
        check(0.0 <= self.dropout < 1.0, f"unet.dropout={self.dropout} must be in [0, 1)")


register_section(
    "unet",
    UNetConfig,
    # 16 x (1, 2, 4), one residual block per level, up-sampling blocks at the finer
    # level's width: 0.49 GFLOP per (slice, patch) pair at 48x48 (docs/results.md)
    cpu=lambda u: replace(
        u,
        model_channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        num_head_channels=32,
        norm_groups=8,
        up_width="next",
    ),
    tiny=lambda u: replace(
        u, model_channels=16, num_res_blocks=1, num_head_channels=16, norm_groups=8
    ),
)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def modulate(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Scale-shift (FiLM) conditioning: h * (1 + scale) + shift."""
    return h * (1 + scale[..., None, None]) + shift[..., None, None]


class ResBlock(nn.Module):
    """Residual block with time conditioning; optional 2x up- or down-sampling."""

    def __init__(
        self,
        ch: int,
        emb_ch: int,
        out_ch: int,
        groups: int,
        dropout: float,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, ch)
        self.in_conv = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.up, self.down = up, down
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=1)
        h = modulate(self.out_norm(h), scale, shift)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Global multi-head self-attention over all pixels of a feature map."""

    def __init__(self, ch: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = ch // head_channels
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv1d(ch, ch, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, L)
        # contiguous (B, h, L, c): with a strided last dimension the CPU dispatcher
        # falls back from the fused kernel to the math path (2.5x slower, measured)
        q, k, v = (
            qkv.reshape(B, 3, self.heads, C // self.heads, H * W)
            .permute(1, 0, 2, 4, 3)
            .contiguous()
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, c)
        out = out.permute(0, 1, 3, 2).reshape(B, C, H * W)
        return x + self.proj(out).reshape(B, C, H, W)


class Stage(nn.Sequential):
    """A sequence of blocks that all receive the time embedding where they take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock | AttentionBlock) else layer(x)
        return x


class UNet(nn.Module):
    """Diffusion U-Net predicting x0; with `mae` set, the MAE output is added to the
    encoder feature map f (H/4) before the middle block. The deepest skip connection
    carries the same enhanced map, so both the bottleneck and the decoder see it."""

    def __init__(self, cfg: UNetConfig, geometry: GeometryConfig, mae: MAEConfig | None = None):
        super().__init__()
        self.cfg = cfg
        mc, g, drop = cfg.model_channels, cfg.norm_groups, cfg.dropout
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        in_ch = cfg.in_channels + (2 if cfg.condition_channels else 0)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_head_channels, g)

        self.input_blocks = nn.ModuleList([Stage(nn.Conv2d(in_ch, mc, 3, padding=1))])
        skip_chs, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mult * mc, g, drop)]
                ch = mult * mc
                if ds in cfg.attention_levels:
                    layers.append(attention(ch))
                self.input_blocks.append(Stage(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Stage(ResBlock(ch, emb_ch, ch, g, drop, down=True)))
                skip_chs.append(ch)
                ds *= 2
        self.feature_channels, self.feature_downsampling = ch, ds

        self.mae = MAE(mae, ch, geometry, emb_ch) if mae is not None and mae.enabled else None
        self.middle = Stage(
            ResBlock(ch, emb_ch, ch, g, drop), attention(ch), ResBlock(ch, emb_ch, ch, g, drop)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_ch, mult * mc, g, drop)]
                ch = mult * mc
                if ds in cfg.attention_levels:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    # ADM keeps the width through the up-sampling block ("same"); "next"
                    # gives it the finer level's width, which that level's blocks use
                    out_ch = mc * cfg.channel_mult[level - 1] if cfg.up_width == "next" else ch
                    layers.append(ResBlock(ch, emb_ch, out_ch, g, drop, up=True))
                    ch = out_ch
                    ds //= 2
                self.output_blocks.append(Stage(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(g, ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        visible: Tensor | None = None,
        cond: Tensor | None = None,
        num_visible: int | None = None,
        clean: Tensor | None = None,
    ) -> Tensor:
        """x: (B, 1, H, W); t: (B,); visible: (B, N) bool grid cells the MAE encoder sees;
        cond: (B, 2, H, W) visible region and patch mask when `condition_channels`;
        num_visible: True cells per row of `visible` when known (see MAE.forward_encoder);
        clean: (B, 1, H, W) the clean image, read by the MAE when mae.tokens is "clean"."""
        f, o, hs, emb = self.encode(x, t, visible, cond, num_visible, clean)
        h = f
        if o is not None:  # paper §3.3: added to f before the bottleneck
            h = h + o
            hs[-1] = h
        h = self.middle(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def encode(
        self,
        x: Tensor,
        t: Tensor,
        visible: Tensor | None = None,
        cond: Tensor | None = None,
        num_visible: int | None = None,
        clean: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, list[Tensor], Tensor]:
        """The encoder half of `forward` (same arguments): the feature map f (B, C, H/4,
        W/4), the MAE branch's output added to it (None without the MAE), the skip
        connections (the last is f) and the time embedding. A method of its own so that
        the branch output can be read (benchmark/probe.py) without hooks, which a
        compiled forward does not run."""
        if self.cfg.condition_channels:
            if cond is None:
                raise ValueError(
                    "this U-Net was built with condition_channels=True and needs `cond`"
                )
            x = torch.cat([x, cond], dim=1)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        if self.mae is None:
            return h, None, hs, emb
        if visible is None:
            raise ValueError("the MAE branch needs the visible-cell mask `visible`")
        return h, self.mae(h, visible, emb, num_visible, clean), hs, emb


__all__ = ["AttentionBlock", "ResBlock", "UNet", "timestep_embedding"]
