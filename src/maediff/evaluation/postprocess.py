"""Post-processing of residual maps (docs/evaluation.md §Protocol, steps 2, 3 and 6).

The protocol's defaults live here once; `EvalSettings` (protocol.py) and `detect`
(pipeline/detect.py) take them from these constants.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

EROSION_ITERATIONS = 3  # slice-wise erosion of the brain mask, 3x3 cross (step 2)
MEDIAN_SIZE = 5  # 3-D median filter, 5x5x5 (step 3)
MIN_COMPONENT = 7  # 26-connected components of this many voxels or fewer are removed (step 6)


def _check_3d(name: str, a: np.ndarray) -> None:
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D volume (X, Y, Z), got shape {a.shape}")


def erode_mask_slicewise(mask: np.ndarray, iterations: int = EROSION_ITERATIONS) -> np.ndarray:
    """Erode a brain mask within each axial slice (last axis) with a 3x3 cross.

    Voxels on the border of the array count as outside (scipy's border_value=0).
    """
    _check_3d("mask", mask)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)  # cross, in-plane only
    if iterations <= 0:
        return mask.astype(bool)
    return ndimage.binary_erosion(mask.astype(bool), structure=structure, iterations=iterations)


def median_filter_3d(volume: np.ndarray, size: int = MEDIAN_SIZE) -> np.ndarray:
    """3-D median filter (scipy, mode 'reflect'), computed on the bounding box of the
    non-zero voxels plus a margin. Far from that box every neighbourhood holds only
    zeros, so the result equals filtering the whole volume while doing less work."""
    _check_3d("volume", volume)
    nz = np.argwhere(volume != 0)
    if len(nz) == 0:
        return np.zeros_like(volume)
    half = size // 2
    lo = np.maximum(nz.min(0) - 2 * half, 0)
    hi = np.minimum(nz.max(0) + 2 * half + 1, volume.shape)
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    filtered = ndimage.median_filter(volume[region], size=size, mode="reflect")
    out = np.zeros_like(volume)
    # voxels more than `half` outside the non-zero box only see zeros: keep them 0;
    # inner voxels of the crop have their full neighbourhood inside the crop.
    ilo = np.maximum(nz.min(0) - half, 0)
    ihi = np.minimum(nz.max(0) + half + 1, volume.shape)
    inner = tuple(slice(a, b) for a, b in zip(ilo, ihi))
    inner_in_crop = tuple(slice(a - c, b - c) for a, b, c in zip(ilo, ihi, lo))
    out[inner] = filtered[inner_in_crop]
    return out


def anomaly_scores(
    residual: np.ndarray,
    brain_mask: np.ndarray,
    erosion_iterations: int = EROSION_ITERATIONS,
    median_size: int = MEDIAN_SIZE,
) -> np.ndarray:
    """Residual -> score map: times the slice-wise eroded brain mask, then a 3-D median
    filter (docs/evaluation.md §Protocol, steps 2-3). median_size 0 or 1 skips the filter."""
    _check_3d("residual", residual)
    if residual.shape != brain_mask.shape:
        raise ValueError(
            f"residual {residual.shape} and brain mask {brain_mask.shape} differ in shape"
        )
    scores = residual.astype(np.float32) * erode_mask_slicewise(brain_mask, erosion_iterations)
    return median_filter_3d(scores, median_size) if median_size > 1 else scores


def remove_small_components(binary: np.ndarray, max_size: int = MIN_COMPONENT) -> np.ndarray:
    """Drop 26-connected components of `max_size` voxels or fewer (step 6)."""
    _check_3d("binary", binary)
    labels, n = ndimage.label(binary.astype(bool), structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros(binary.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_size
    keep[0] = False
    return keep[labels]
