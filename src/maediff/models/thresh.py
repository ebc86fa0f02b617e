"""Thresh (Table 1): intensity thresholding. The "reconstruction" is zero, so the
anomaly map is the image itself, post-processed and thresholded by the same protocol
as every model (bright T2 lesions stand out). Nothing to train."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import register_model
from .base import AnomalyModel


@register_model("thresh")
class Thresh(AnomalyModel):
    trainable = False
    any_size = True  # works on the volume's own slices, never resized
    description = "intensity thresholding: anomaly map = the image"

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
        if slices.dim() != 4 or slices.shape[1] != 1:
            raise ValueError(f"expected slices of shape (S, 1, H, W), got {tuple(slices.shape)}")
        if progress is not None:
            progress(slices.shape[0])
        return torch.zeros_like(slices)


__all__ = ["Thresh"]
