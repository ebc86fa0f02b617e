"""Normative scoring (beyond the paper; docs/evaluation.md §3d): the residual measured
against what healthy tissue of the same intensity leaves.

The paper scores a voxel by its residual |x - x_rec|. Healthy tissue does not leave the
same residual everywhere: bright CSF (ventricles, sulci) and the cortex's edges are
reconstructed less well than white matter, and light up in every map. In the spirit of
Behrendt et al.'s Mahalanobis-distance scoring (2024), but per intensity band instead
of per voxel (so it needs no registration), the residuals of healthy validation
volumes give, for each band of input intensity, their mean mu_b and standard deviation
sd_b; a voxel of intensity in band b then scores

    z = max(|x - x_rec| - mu_b, 0) / sd_b

(healthy tissue around 0, in units of its own spread), and the protocol's
post-processing, threshold search and metrics follow unchanged. Bands are of equal
width between the lowest and highest healthy brain intensity (intensities outside go
to the outer bands); a band with fewer than MIN_VOXELS healthy voxels takes the
statistics of all of them. Pure arrays, no torch.

    norm = BandNormaliser.fit([(image, rec, brain), ...])
    z = norm.apply(residual, image)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .postprocess import erode_mask_slicewise

BANDS = 16
MIN_VOXELS = 50  # a band with fewer healthy voxels takes the pooled statistics
MIN_SD = 1e-3  # floor of a band's spread (image units): a flat band must not blow up


@dataclass(frozen=True, eq=False)
class BandNormaliser:
    """Per-band mean and spread of healthy residuals. edges: (B + 1,) intensity band
    edges (the outer ones open); mean, sd: (B,)."""

    edges: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    volumes: int = 0
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = len(self.mean)
        if len(self.edges) != b + 1 or len(self.sd) != b or b < 1:
            raise ValueError(
                f"normaliser: {len(self.edges)} edges for {b} means and {len(self.sd)} spreads"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(self.sd > 0)):
            raise ValueError("normaliser: means must be finite and spreads positive")

    @classmethod
    def fit(
        cls,
        healthy: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
        bands: int = BANDS,
        names: Iterable[str] = (),
    ) -> BandNormaliser:
        """From healthy (image, reconstruction, brain mask) volumes: the residuals inside
        the slice-wise eroded brain (where the protocol scores), binned by intensity."""
        xs, rs, n = [], [], 0
        for image, rec, brain in healthy:
            inside = erode_mask_slicewise(brain)
            x = image[inside].astype(np.float64)
            xs.append(x)
            rs.append(np.abs(x - rec[inside].astype(np.float64)))
            n += 1
        if n == 0 or sum(len(x) for x in xs) < bands * MIN_VOXELS:
            raise ValueError(
                f"normative scoring needs healthy brain voxels: {n} volume(s) gave "
                f"{sum(len(x) for x in xs)} (at least {bands * MIN_VOXELS})"
            )
        x, r = np.concatenate(xs), np.concatenate(rs)
        edges = np.linspace(x.min(), x.max(), bands + 1)
        band = _band_of(x, edges)
        mean, sd = np.full(bands, r.mean()), np.full(bands, r.std())
        for b in range(bands):
            sel = band == b
            if sel.sum() >= MIN_VOXELS:
                mean[b], sd[b] = r[sel].mean(), r[sel].std()
        return cls(edges, mean, np.maximum(sd, MIN_SD), n, list(names))

    def apply(self, residual: np.ndarray, image: np.ndarray) -> np.ndarray:
        """z = max(residual - mu_b, 0) / sd_b, b the band of each voxel's intensity."""
        if residual.shape != image.shape:
            raise ValueError(f"residual {residual.shape} and image {image.shape} differ in shape")
        band = _band_of(image, self.edges)
        z = (residual - self.mean[band]) / self.sd[band]
        return np.maximum(z, 0).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "intensity bands",
            "edges": [round(float(v), 6) for v in self.edges],
            "mean": [round(float(v), 6) for v in self.mean],
            "sd": [round(float(v), 6) for v in self.sd],
            "volumes": self.volumes,
            "sources": list(self.sources),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BandNormaliser:
        try:
            return cls(
                np.asarray(d["edges"], float),
                np.asarray(d["mean"], float),
                np.asarray(d["sd"], float),
                int(d.get("volumes", 0)),
                list(d.get("sources", [])),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"normaliser record is incomplete: {e}") from e


def _band_of(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Band index 0..B-1 of each value; values outside the edges go to the outer bands."""
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)


__all__ = ["BANDS", "BandNormaliser"]
