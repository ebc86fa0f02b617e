"""Maps back on the raw scan (`maediff detect --raw-space RAW`): a scan that `maediff
preprocess` registered to a template carries the transform back to the raw scan it
came from (NAME_to_raw.tfm, an ITK transform file); the maps, computed on the model
grid, are resampled once onto the raw scan's voxel grid through it.

    spaces = raw_spaces(prep_subjects, "raw/")            # name -> RawSpace, checked up front
    raw_map = spaces["sub-01"].resample(vol, score_map)   # (I, J, K) on the raw scan's grid
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .io import DataError, Subject, load_nifti
from .load import PreparedVolume, to_sitk
from .preprocess import TRANSFORM_SUFFIX
from .splits import read_inputs


@dataclass
class RawSpace:
    """The raw scan (its grid: affine and shape) and the transform from the
    preprocessed scan's space to it (maps points of the preprocessed space to points
    of the raw scan's, as ITK's registration result does)."""

    reference: nib.Nifti1Image
    to_raw: sitk.Transform

    def resample(self, vol: PreparedVolume, volume: np.ndarray, labels: bool = False) -> np.ndarray:
        """A model-grid volume (X, Y, Z) on the raw scan's voxel grid: one resampling,
        linear (nearest neighbour for labels), 0 outside the model grid."""
        src = to_sitk(volume.astype(np.float32), vol.affine)
        ref = to_sitk(np.zeros(self.reference.shape[:3], np.float32), self.reference.affine)
        # Resample asks, for each raw voxel, where it lies in the source: raw -> preprocessed
        back = self.to_raw.GetInverse()
        interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
        out = sitk.Resample(src, ref, back, interp, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def read_transform(path: str | Path) -> sitk.Transform:
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError as e:
        raise DataError(f"{path} is not an ITK transform file: {str(e).splitlines()[-1]}") from e


def raw_spaces(subjects: Sequence[Subject], raw: str | Path) -> dict[str, RawSpace]:
    """For each preprocessed scan, its raw scan (of the same name in `raw`: a folder,
    CSV or file as any input) and its NAME_to_raw.tfm (beside it). Checked for every
    scan before any work: a DataError names the first scan whose raw scan or transform
    is missing."""
    by_name = {s.name: s for s in read_inputs(raw)}
    out = {}
    for s in subjects:
        tfm = s.image.with_name(s.name + TRANSFORM_SUFFIX)
        if s.name not in by_name:
            raise DataError(
                f"--raw-space {raw} has no scan named {s.name} (the raw scan of {s.image})"
            )
        if not tfm.is_file():
            raise DataError(
                f"{s.image} has no {tfm.name} beside it (maediff preprocess writes it); "
                "without it its maps cannot go back to the raw scan"
            )
        out[s.name] = RawSpace(load_nifti(by_name[s.name].image, "raw scan"), read_transform(tfm))
    return out


__all__ = ["RawSpace", "raw_spaces", "read_transform"]
