"""Volumes in memory and the slices the model trains on.

    vols = load_volumes(subjects, cfg.data)                   # PreparedVolume list
    slices = SliceSet(vols, image_size=cfg.geometry.image_size)
    for batch in slices.epoch(batch_size=32, generator=g): ...   # (B, 1, h, w)

An epoch is pDDPM's: one random axial slice per volume (or every slice with
`all_slices`), shuffled. Slices are resized to the model's size with area
averaging, so a preset can train below the protocol's 96x96.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import DataConfig
from .io import DataError, Subject, load_nifti
from .load import PreparedVolume, prepare_volume


def load_subject(s: Subject, cfg: DataConfig) -> PreparedVolume:
    image = load_nifti(s.image, "image")
    mask = load_nifti(s.mask, "brain mask") if s.mask is not None else None
    seg = load_nifti(s.seg, "segmentation") if s.seg is not None else None
    for kind, other, p in (("brain mask", mask, s.mask), ("segmentation", seg, s.seg)):
        if other is not None and other.shape[:3] != image.shape[:3]:
            raise DataError(
                f"{kind} {p} has shape {other.shape[:3]} but image {s.image} has shape {image.shape[:3]}"
            )
    try:
        return prepare_volume(image, mask, seg, cfg, name=s.name)
    except DataError as e:
        raise DataError(f"{s.image}: {e}") from e


def load_volumes(
    subjects: Sequence[Subject], cfg: DataConfig, desc: str = "loading", progress: bool = True
) -> list[PreparedVolume]:
    return [
        load_subject(s, cfg)
        for s in tqdm(subjects, desc=desc, unit="vol", disable=not progress, leave=False)
    ]


def volume_to_slices(volume: np.ndarray, size: int, mode: str = "area") -> torch.Tensor:
    """(X, Y, Z) -> (Z, 1, size, size) float32 axial slices, resized."""
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume.astype(np.float32), -1, 0)))[
        :, None
    ]
    if t.shape[-1] != size or t.shape[-2] != size:
        t = (
            F.interpolate(t, size=(size, size), mode=mode)
            if mode != "nearest"
            else F.interpolate(t, size=(size, size), mode="nearest")
        )
    return t


def slices_to_volume(slices: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, 1, h, w) -> (X, Y, Z) array at the volume's in-plane size (bilinear)."""
    if slices.shape[-2:] != shape[:2]:
        slices = F.interpolate(slices.float(), size=shape[:2], mode="bilinear", align_corners=False)
    return np.moveaxis(slices[:, 0].cpu().numpy(), 0, -1)


class SliceSet:
    """Axial slices of many volumes at the model's size, with their brain masks."""

    def __init__(
        self, volumes: Sequence[PreparedVolume], image_size: int, min_brain_fraction: float = 0.0
    ):
        if not volumes:
            raise DataError("no volumes to take training slices from")
        self.images = [volume_to_slices(v.image, image_size) for v in volumes]
        masks = [volume_to_slices(v.brain_mask.astype(np.float32), image_size) for v in volumes]
        frac = [m.mean(dim=(1, 2, 3)) for m in masks]
        self.valid = [torch.nonzero(f > min_brain_fraction).flatten() for f in frac]
        empty = [v.name for v, idx in zip(volumes, self.valid) if len(idx) == 0]
        if empty:
            raise DataError(f"volumes with no usable brain slice: {', '.join(empty[:5])}")
        self.names = [v.name for v in volumes]

    def __len__(self) -> int:
        return len(self.images)

    def epoch_size(self, all_slices: bool = False, per_volume: int = 1) -> int:
        return sum(len(v) for v in self.valid) if all_slices else per_volume * len(self.valid)

    def epoch_indices(
        self, generator: torch.Generator, all_slices: bool = False, per_volume: int = 1
    ) -> list[tuple[int, int]]:
        """(volume, slice) pairs of one epoch, shuffled: every usable slice, or
        `per_volume` random ones per volume (pDDPM: 1)."""
        if all_slices:
            pairs = [(v, int(z)) for v, idx in enumerate(self.valid) for z in idx]
        else:
            pairs = [
                (v, int(idx[i]))
                for v, idx in enumerate(self.valid)
                for i in torch.randint(len(idx), (per_volume,), generator=generator)
            ]
        order = torch.randperm(len(pairs), generator=generator).tolist()
        return [pairs[i] for i in order]

    def batches(self, pairs: Sequence[tuple[int, int]], batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            yield torch.stack([self.images[v][z] for v, z in chunk])

    def volume_order(self, generator: torch.Generator) -> list[int]:
        """Volume indices of one epoch, shuffled (models that see whole volumes)."""
        return torch.randperm(len(self.images), generator=generator).tolist()

    def volume_batches(self, order: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        """Whole volumes: (B, S, 1, h, w) with every axial slice of each volume."""
        for i in range(0, len(order), batch_size):
            yield torch.stack([self.images[v] for v in order[i : i + batch_size]])
