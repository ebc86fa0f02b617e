"""Hierarchical patch partition (paper §3.2, Fig. 1).

Upper-level patches: p x p windows whose top-left corners lie on a grid of step s,
K = (H - p + s)(W - p + s) / s^2 positions, enumerated row-major.
Sub-level grid: non-overlapping r x r cells, N = HW / r^2, enumerated row-major.
Because s and p are multiples of r, every patch covers exactly (p/r)^2 whole cells,
and on the U-Net feature map at H/4 each cell is (r/4) x (r/4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import GeometryConfig, validate_geometry


class PatchGrid:
    """Patch positions, patch masks M_p, grid cells and stitching for one geometry."""

    def __init__(self, geometry: GeometryConfig):
        validate_geometry(geometry)
        self.geometry = geometry
        self.H = self.W = geometry.image_size
        self.p, self.s, self.r = geometry.patch_size, geometry.stride, geometry.grid_size
        n = geometry.positions_per_axis
        tops = torch.arange(n) * self.s
        # (K, 2) top-left corners (row, col), row-major
        self.positions = torch.stack(torch.meshgrid(tops, tops, indexing="ij"), dim=-1).reshape(
            -1, 2
        )
        self.num_patches = len(self.positions)
        self._positions_on: dict[str, Tensor] = {}  # the corners on each device, copied once
        self.cells_per_axis = self.H // self.r
        self.num_cells = self.cells_per_axis**2

    # ------------------------------------------------------------------ masks

    def patch_masks(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """M_p for every position: (K, 1, H, W), 1 inside the patch and 0 outside."""
        masks = torch.zeros(self.num_patches, 1, self.H, self.W, dtype=dtype, device=device)
        for k, (y, x) in enumerate(self.positions.tolist()):
            masks[k, :, y : y + self.p, x : x + self.p] = 1
        return masks

    def masked_cells(self) -> Tensor:
        """Which grid cells each patch covers: (K, N) bool, True = masked (noised)."""
        c = self.cells_per_axis
        out = torch.zeros(self.num_patches, c, c, dtype=torch.bool)
        n = self.p // self.r
        for k, (y, x) in enumerate(self.positions.tolist()):
            out[k, y // self.r : y // self.r + n, x // self.r : x // self.r + n] = True
        return out.reshape(self.num_patches, self.num_cells)

    def coverage(self, device: torch.device | str | None = None) -> Tensor:
        """How many patches cover each pixel: (1, H, W). Zero where no patch reaches."""
        return self.patch_masks(device).sum(0)

    # ------------------------------------------------------------------ split / stitch

    def extract(self, images: Tensor) -> Tensor:
        """Cut every patch out of every image: (B, C, H, W) -> (B, K, C, p, p)."""
        B, C, H, W = images.shape
        self._check_size(H, W)
        cols = F.unfold(images, kernel_size=self.p, stride=self.s)  # (B, C*p*p, K)
        return cols.transpose(1, 2).reshape(B, self.num_patches, C, self.p, self.p)

    def positions_on(self, device: torch.device) -> Tensor:
        """The corners on `device`, copied there once: a copy from pageable host memory
        at every call made the host wait for the GPU at every inference chunk."""
        if device.type == "cpu":
            return self.positions
        key = str(device)
        if key not in self._positions_on:
            self._positions_on[key] = self.positions.to(device)
        return self._positions_on[key]

    def crop(self, images: Tensor, k: Tensor) -> Tensor:
        """The patch at position k[i] of image i: (n, C, H, W), (n,) -> (n, C, p, p)."""
        n, C = images.shape[:2]
        ar = torch.arange(self.p, device=images.device)
        pos = self.positions_on(images.device)[k]  # (n, 2)
        rows = (pos[:, 0, None] + ar)[:, :, None]  # (n, p, 1)
        cols = (pos[:, 1, None] + ar)[:, None, :]  # (n, 1, p)
        idx = torch.arange(n, device=images.device)[:, None, None]
        return images.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)

    def stitch(self, patches: Tensor) -> Tensor:
        """Average overlapping patches back into images (Alg. 2 lines 10-13).

        patches: (B, K, C, p, p) -> (B, C, H, W). The sum and the count over all
        patches are accumulated first and divided once; pixels no patch covers are 0.
        """
        B, K, C, p, _ = patches.shape
        if K != self.num_patches or p != self.p:
            raise ValueError(
                f"expected (B, {self.num_patches}, C, {self.p}, {self.p}) patches, got {tuple(patches.shape)}"
            )
        cols = patches.reshape(B, K, C * p * p).transpose(1, 2)
        total = F.fold(cols, (self.H, self.W), kernel_size=p, stride=self.s)
        count = self.coverage(patches.device).to(total.dtype)
        return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))

    def stitch_selected(self, patches: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
        """Average only the selected patches: patches (B, K, C, p, p), selected (B, K)
        bool -> (images (B, C, H, W), count (B, 1, H, W) of selected patches per pixel);
        pixels no selected patch covers are 0 with count 0."""
        B, K, C, p, _ = patches.shape
        w = selected.to(patches.dtype)
        cols = (patches * w[:, :, None, None, None]).reshape(B, K, C * p * p).transpose(1, 2)
        total = F.fold(cols, (self.H, self.W), kernel_size=p, stride=self.s)
        ones = w[:, :, None].expand(B, K, p * p).transpose(1, 2)
        count = F.fold(ones, (self.H, self.W), kernel_size=p, stride=self.s)
        return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)), count

    def _check_size(self, H: int, W: int) -> None:
        if (H, W) != (self.H, self.W):
            raise ValueError(f"images are {H}x{W} but the geometry expects {self.H}x{self.W}")


__all__ = ["PatchGrid"]
