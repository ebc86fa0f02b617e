"""Thresh (Table 1): intensity thresholding. The "reconstruction" is zero, so the
anomaly map is the image itself, post-processed and thresholded by the same protocol
as every model (bright T2 lesions stand out). Nothing to train."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import Preset
from .base import AnomalyModel
from .register import register_model


@register_model(
    "thresh",
    presets=(Preset("thresh", "Thresh", table=("1", 10)),),
)
class Thresh(AnomalyModel):
    trainable = False
    any_size = True  # works on the volume's own slices, never resized
    description = "intensity thresholding: anomaly map = the image"

    def check_images(self, x: Tensor) -> None:
        """Any slice size: thresholding works on the volume's own slices."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected slices of shape (S, 1, H, W), got {tuple(x.shape)}")

    def reconstruct_batch(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


__all__ = ["Thresh"]
