"""The MAE module of paper §3.3 (Fig. 2), operating on grid cells of the U-Net
encoder feature map f: (B, C, H/4, W/4), cut into (r/4) x (r/4) cells -> N tokens.

- Encoder: linear patchify of f to d1, fixed 2-D sin-cos position embeddings, then
  ViT blocks on the *visible* tokens only (masked cells are dropped, as in MAE).
- Decoder: its own linear patchify of the *whole* f to d2, position embeddings,
  optionally the timestep embedding, then blocks of cross-attention (to the
  visible latents of one encoder block) -> self-attention -> MLP. Decoder block i
  attends to encoder block round(linspace(enc_depth - 1, 0, dec_depth))[i]: the
  first decoder block to the deepest encoder output, a U shape.
- Output: tokens reshaped to d2 x H/r x W/r and upsampled to C x H/4 x W/4 by
  transposed convolutions; the U-Net adds it to f.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GeometryConfig
from ..registry import check, register_section


@dataclass(frozen=True)
class MAEConfig:
    """MAE module on the U-Net encoder feature map (paper §3.3, §4.3)."""

    enabled: bool = True
    enc_dim: int = 384  # d1
    enc_depth: int = 12
    enc_heads: int = 6
    dec_dim: int = 512  # d2
    dec_depth: int = 8
    dec_heads: int = 16
    mlp_ratio: float = 4.0
    timestep: bool = False  # add the timestep embedding to the decoder tokens
    # Zero-initialise the last upsampling layer, so that the branch adds nothing at step 0
    # and MAEDiff starts as the plain U-Net (as ControlNet-style adapters do). Off: the
    # paper's description, whose random upsampler perturbs f from the first step.
    zero_init: bool = False
    # Beyond the paper (docs/method.md §MAE token variants), both off by default:
    # tokens: what the encoder's visible tokens are cut from. "features" (the paper): the
    # U-Net encoder feature map f of the noised input, whose visible cells depend on the
    # noised patch through the convolutions' receptive field; "clean": the clean visible
    # region x^_0 itself (the r x r pixels of each visible cell), independent of the patch.
    tokens: str = "features"
    # token_norm: LayerNorm on the token embeddings before the position embedding is added
    # (a linear patchify of f starts about a sixth of the sin-cos embedding's size)
    token_norm: bool = False

    def __post_init__(self) -> None:
        check(
            self.tokens in ("features", "clean"),
            f"mae.tokens={self.tokens!r} must be 'features' or 'clean'",
        )
        check(
            self.enc_dim % self.enc_heads == 0,
            f"mae.enc_heads={self.enc_heads} does not divide mae.enc_dim={self.enc_dim}",
        )
        check(
            self.dec_dim % self.dec_heads == 0,
            f"mae.dec_heads={self.dec_heads} does not divide mae.dec_dim={self.dec_dim}",
        )
        check(
            self.enc_depth >= 1 and self.dec_depth >= 1,
            f"mae depths must be >= 1 (enc_depth={self.enc_depth}, dec_depth={self.dec_depth})",
        )


register_section(
    "mae",
    MAEConfig,
    # the `cpu` scale cuts the encoder's tokens from the clean visible region (docs/history/0.8.0.md,
    # "A recipe that learns faster"); the paper's feature tokens stay the default
    cpu=lambda m: replace(
        m,
        enc_dim=128,
        enc_depth=4,
        enc_heads=4,
        dec_dim=128,
        dec_depth=2,
        dec_heads=4,
        tokens="clean",
    ),
    tiny=lambda m: replace(
        m, enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=2, dec_heads=2
    ),
)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / ViT): (grid*grid, dim), row-major.

    Half of the channels encode the row, half the column; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"position embedding width {dim} must be a multiple of 4")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def embed_1d(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(
        np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij"
    )
    emb = np.concatenate([embed_1d(rows.reshape(-1)), embed_1d(cols.reshape(-1))], axis=1)
    return torch.from_numpy(emb).float()


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, h, L, c)
        k, v = (
            self.kv(ctx)
            .view(B, ctx.shape[1], 2, self.heads, D // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, c)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


def mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """ViT block: x + SelfAttn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Cross-attention to encoder latents -> self-attention -> MLP (paper §3.3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int):
        super().__init__()
        self.norm_x, self.norm_ctx = nn.LayerNorm(dim), nn.LayerNorm(context_dim)
        self.cross = Attention(dim, heads, context_dim)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x = x + self.cross(self.norm_x(x), self.norm_ctx(latents))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _upsampler(in_ch: int, out_ch: int, factor: int) -> nn.Module:
    """Transposed convolutions from H/r to H/4: stride-2 layers when `factor` is a power
    of two, otherwise one layer of stride `factor`; a 1x1 conv when factor is 1."""
    if factor == 1:
        return nn.Conv2d(in_ch, out_ch, 1)
    if factor & (factor - 1):
        return nn.ConvTranspose2d(in_ch, out_ch, factor, stride=factor)
    layers: list[nn.Module] = [nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)]
    for _ in range(int(np.log2(factor)) - 1):
        layers += [nn.SiLU(), nn.ConvTranspose2d(out_ch, out_ch, 2, stride=2)]
    return nn.Sequential(*layers)


def decoder_to_encoder_map(enc_depth: int, dec_depth: int) -> list[int]:
    """Encoder block whose output decoder block i attends to (U shape, uniform)."""
    if dec_depth == 1:
        return [enc_depth - 1]
    return [int(round(v)) for v in np.linspace(enc_depth - 1, 0, dec_depth)]


class MAE(nn.Module):
    """f: (B, C, h, w), visible: (B, N) bool, emb: (B, E) -> (B, C, h, w)."""

    def __init__(self, cfg: MAEConfig, channels: int, geometry: GeometryConfig, emb_ch: int):
        super().__init__()
        self.cfg = cfg
        self.cell = geometry.grid_size // 4  # cell side on the feature map
        self.pixel_cell = geometry.grid_size  # cell side on the image (tokens: clean)
        self.cells_per_axis = geometry.image_size // geometry.grid_size
        token_in = channels * self.cell**2
        n = self.cells_per_axis
        enc_in = self.pixel_cell**2 if cfg.tokens == "clean" else token_in
        self.enc_embed = nn.Linear(enc_in, cfg.enc_dim)
        self.dec_embed = nn.Linear(token_in, cfg.dec_dim)
        # token_norm: embeddings of unit rms before the position embedding is added
        self.enc_norm = nn.LayerNorm(cfg.enc_dim) if cfg.token_norm else nn.Identity()
        self.dec_tok_norm = nn.LayerNorm(cfg.dec_dim) if cfg.token_norm else nn.Identity()
        self.register_buffer("enc_pos", sincos_pos_embed_2d(cfg.enc_dim, n)[None], persistent=False)
        self.register_buffer("dec_pos", sincos_pos_embed_2d(cfg.dec_dim, n)[None], persistent=False)
        self.encoder = nn.ModuleList(
            EncoderBlock(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio) for _ in range(cfg.enc_depth)
        )
        self.decoder = nn.ModuleList(
            DecoderBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cfg.enc_dim)
            for _ in range(cfg.dec_depth)
        )
        self.attend_to = decoder_to_encoder_map(cfg.enc_depth, cfg.dec_depth)
        self.time = (
            nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, cfg.dec_dim)) if cfg.timestep else None
        )
        self.dec_norm = nn.LayerNorm(cfg.dec_dim)
        self.upsample = _upsampler(cfg.dec_dim, channels, self.cell)
        if cfg.zero_init:  # the branch starts as an exact no-op: MAEDiff = its U-Net at step 0
            last = [
                m for m in self.upsample.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
            ][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def patchify(self, f: Tensor, cell: int | None = None) -> Tensor:
        """(B, C, h, w) -> (B, N, C * c * c) with c = r/4 (or `cell`), cells row-major."""
        B, C, h, w = f.shape
        c, n = cell or self.cell, self.cells_per_axis
        if (h, w) != (n * c, n * c):
            raise ValueError(f"MAE expects a {n * c}x{n * c} feature map, got {h}x{w}")
        return f.reshape(B, C, n, c, n, c).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, C * c * c)

    @staticmethod
    def count_visible(visible: Tensor) -> int:
        """The number of visible cells per sample, checked to be the same non-zero number
        for every sample. Reads the mask back to the host (on a GPU: waits for it)."""
        counts = visible.sum(1)
        if counts.min() != counts.max() or int(counts[0]) == 0:
            raise ValueError(
                f"every sample needs the same, non-zero number of visible cells; got {counts.tolist()}"
            )
        return int(counts[0])

    def forward_encoder(
        self, tokens: Tensor, visible: Tensor, num_visible: int | None = None
    ) -> list[Tensor]:
        """Visible tokens only -> the output of every encoder block: list of (B, V, d1).

        num_visible: the number V of True cells in every row of `visible`, when the caller
        knows it by construction (MAEDiff: every patch covers the same (p/r)^2 cells). The
        mask is then not read back to the host, which on a GPU would wait at every step
        (and break a compiled graph). None: counted and checked (`count_visible`)."""
        if num_visible is None:
            num_visible = self.count_visible(visible)
        keep = torch.argsort((~visible).to(torch.uint8), dim=1, stable=True)[
            :, :num_visible
        ]  # (B, V)
        z = self.enc_norm(self.enc_embed(tokens)) + self.enc_pos
        z = torch.gather(z, 1, keep[..., None].expand(-1, -1, z.shape[-1]))
        outs = []
        for block in self.encoder:
            z = block(z)
            outs.append(z)
        return outs

    def forward_decoder(self, tokens: Tensor, latents: list[Tensor], emb: Tensor) -> Tensor:
        """All tokens attend to the encoder latents: (B, N, d2)."""
        z = self.dec_tok_norm(self.dec_embed(tokens)) + self.dec_pos
        if self.time is not None:
            z = z + self.time(emb)[:, None]
        for block, j in zip(self.decoder, self.attend_to):
            z = block(z, latents[j])
        return self.dec_norm(z)

    def encoder_tokens(self, f: Tensor, clean: Tensor | None) -> Tensor:
        """The tokens the encoder embeds: cells of f (mae.tokens "features", the paper)
        or of the clean image x^_0 (B, 1, H, W) in model range ("clean")."""
        if self.cfg.tokens == "features":
            return self.patchify(f)
        if clean is None:
            raise ValueError("mae.tokens='clean' needs the clean image (U-Net `clean=`)")
        return self.patchify(clean, self.pixel_cell)

    def forward(
        self,
        f: Tensor,
        visible: Tensor,
        emb: Tensor,
        num_visible: int | None = None,
        clean: Tensor | None = None,
    ) -> Tensor:
        """num_visible: see `forward_encoder`; clean: the clean image, for mae.tokens
        "clean" (only its visible cells reach the encoder)."""
        tokens = self.patchify(f)
        latents = self.forward_encoder(self.encoder_tokens(f, clean), visible, num_visible)
        z = self.forward_decoder(tokens, latents, emb)
        n = self.cells_per_axis
        grid = z.transpose(1, 2).reshape(z.shape[0], -1, n, n)  # (B, d2, H/r, W/r)
        return self.upsample(grid)


__all__ = ["MAE", "decoder_to_encoder_map", "sincos_pos_embed_2d"]
