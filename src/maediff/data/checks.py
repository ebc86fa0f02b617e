"""Inputs that are valid but unusual: scored, with a warning naming the scan and a QC
flag in detect's scores table (the `qc` column, flags joined by ';').

    flags = input_flags(nib.load(scan), nib.load(mask), scan)    # [] for a clean scan
    for flag, warning in input_checks(image, mask, scan): ...    # with the words

A refusal would be wrong for these (a probabilistic mask is a mask; a thick-slice scan
is a scan), silence too: each changes the score. The flags, with what each means:

    complex          the image holds complex values; its magnitude is scored
    voxel_size       a voxel edge outside 0.3-7 mm (the model grid resamples it; a brain
                     of a few millilitres, or a few slices, is scored as normal)
    mask_probabilistic   the brain mask holds values other than 0 and 1 (every voxel
                     above 0 counts as brain, 0.001 included)
    mask_affine      the mask's voxel-to-world matrix differs from the image's (by more
                     than 1 mm or 1 %): the mask is taken voxel by voxel, as if it matched
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

VOXEL_MM = (0.3, 7.0)  # plausible voxel edges of a brain MRI, mm
AFFINE_MM = 1.0  # translation difference between image and mask that is flagged, mm
AFFINE_REL = 0.01  # relative difference of the axes that is flagged

FLAG_TEXT = {
    "complex": "the image is complex-valued; its magnitude is scored",
    "voxel_size": "voxel size {zooms} mm is outside {lo:g}-{hi:g} mm; the score may not mean "
    "what it means for the training scans",
    "mask_probabilistic": "the brain mask holds values other than 0 and 1 (e.g. {value:g}); "
    "every voxel above 0 counts as brain",
    "mask_affine": "the brain mask's affine differs from the image's by up to {mm:.3g} mm; the "
    "mask is used voxel by voxel",
}


def input_flags(
    image: nib.Nifti1Image, mask: nib.Nifti1Image | None, path: str | Path
) -> list[str]:
    """The short flag names of `input_checks`."""
    return [name for name, _ in input_checks(image, mask, path)]


def input_checks(
    image: nib.Nifti1Image, mask: nib.Nifti1Image | None, path: str | Path
) -> list[tuple[str, str]]:
    """(flag, the warning in words naming `path`) for each unusual property of a scan
    and its brain mask; the images may be lazily loaded (headers read, voxels of the
    mask only)."""
    out: list[tuple[str, str]] = []

    def flag(name: str, **values) -> None:
        out.append((name, f"{path}: {FLAG_TEXT[name].format(**values)}"))

    if np.issubdtype(image.get_data_dtype(), np.complexfloating):
        flag("complex")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    lo, hi = VOXEL_MM
    if any(not lo <= z <= hi for z in zooms):
        flag("voxel_size", zooms="x".join(f"{z:g}" for z in zooms), lo=lo, hi=hi)
    if mask is not None:
        values = np.asanyarray(mask.dataobj)
        if values.dtype.names is None:  # an RGB mask is refused where it is loaded
            odd = values[(values != 0) & (values != 1)]
            if odd.size:
                flag("mask_probabilistic", value=float(np.real(odd.flat[0])))
        diff = np.abs(np.asarray(mask.affine) - np.asarray(image.affine))
        axes = np.abs(np.asarray(image.affine)[:3, :3]).max()
        if diff[:3, 3].max() > AFFINE_MM or diff[:3, :3].max() > AFFINE_REL * axes:
            flag("mask_affine", mm=float(diff[:3, :].max()))
    return out


__all__ = ["FLAG_TEXT", "VOXEL_MM", "input_checks", "input_flags"]
