"""Load-time processing (docs/data.md §3) and its inverse.

    vol = prepare_volume(image_nii, mask_nii, seg_nii, cfg.data, name="sub-01")
    vol.image      # (96, 96, 50) float32 in [0, 1], axial slices on the last axis
    back = vol.to_input_space(anomaly_map)     # array on the input file's voxel grid

Steps: CurvatureFlow (time step 0.125, 3 iterations, on the voxel grid; pDDPM parity,
`data.curvature_flow`), after the brain mask is taken from the unsmoothed image; rescale
to [0, 1] between the 1st and 99th percentile of the voxels inside the brain mask
(clipped; voxels outside the mask set to 0), then one SimpleITK resampling onto the
model grid: `volume_shape` voxels of `spacing` mm, axes along the scan's closest
RAS axes, centred on the brain mask's bounding box ("brain") or on the image
("image"). B-spline for images, nearest neighbour for masks and labels. Cropping,
padding and resampling are therefore one operation, and the inverse is a single
resampling of the model grid back onto the input grid (linear for maps, nearest for
labels). Without a brain mask, `image > 0` is used (skull-stripped input assumed).
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy.interpolate import interp1d

from ..config import NYUL_PERCENTILES, DataConfig
from .io import DataError

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """NumPy (i, j, k) array with a nibabel (RAS) affine -> SimpleITK image (LPS)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise DataError(f"affine has a zero-length axis: {affine[:3, :3].tolist()}")
    direction = _RAS_TO_LPS @ (affine[:3, :3] / spacing)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    img.SetOrigin(tuple(float(o) for o in _RAS_TO_LPS @ affine[:3, 3]))
    return img


def from_sitk(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def grid_affine(img: sitk.Image) -> np.ndarray:
    """nibabel (RAS) affine of a SimpleITK image grid."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = _RAS_TO_LPS @ d @ np.diag(img.GetSpacing())
    aff[:3, 3] = _RAS_TO_LPS @ np.array(img.GetOrigin())
    return aff


def curvature_flow(data: np.ndarray, time_step: float = 0.125, iterations: int = 3) -> np.ndarray:
    """SimpleITK CurvatureFlow on the voxel grid (unit spacing), float32 in and out.

    The reference (pDDPM's loader) runs `sitk.CurvatureFlow(timeStep=0.125,
    numberOfIterations=3)` on its 1 mm isotropic images, where physical and voxel
    spacing coincide: the result here is identical there (tested). On other grids the
    filter works per voxel, as on the reference data; with the physical spacing, a
    0.125 time step is unstable below 1 mm (a 0.5 mm scan diverges) and smooths less
    above it.
    """
    img = sitk.GetImageFromArray(np.ascontiguousarray(data, dtype=np.float32))
    out = sitk.CurvatureFlow(img, timeStep=time_step, numberOfIterations=iterations)
    return sitk.GetArrayFromImage(out).astype(np.float32)


def rescale_percentiles(
    data: np.ndarray, mask: np.ndarray, low: float = 1.0, high: float = 99.0
) -> np.ndarray:
    """(x - p_low) / (p_high - p_low) from percentiles inside the mask, clipped to [0, 1]; 0 outside."""
    vals = data[mask]
    if vals.size == 0:
        raise DataError("the brain mask is empty")
    lo, hi = np.percentile(vals, [low, high])
    if hi <= lo:
        raise DataError(f"the image is constant inside the brain mask (percentiles {lo:g}..{hi:g})")
    out = np.clip((data.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    out[~mask] = 0.0
    return out


def _axis_permutation(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel axis closest to each RAS axis, and its sign (nibabel's io_orientation)."""
    ornt = nib.orientations.io_orientation(affine)
    perm = np.zeros(3, dtype=int)
    sign = np.zeros(3)
    for vox_axis, (ras_axis, flip) in enumerate(ornt):
        perm[int(ras_axis)] = vox_axis
        sign[int(ras_axis)] = flip
    return perm, sign


def model_grid(
    reference: sitk.Image, mask: np.ndarray, affine: np.ndarray, cfg: DataConfig
) -> sitk.Image:
    """The model's grid: volume_shape voxels of `spacing` mm along the closest RAS axes,
    centred on the brain (or the image). Where the input spacing divides the target
    spacing, the centre is snapped so that the grids share voxel centres."""
    perm, sign = _axis_permutation(affine)
    # direction: RAS axis a of the output follows voxel axis perm[a] of the input, made positive
    in_dir = np.array(reference.GetDirection()).reshape(3, 3)  # LPS, columns = voxel axes
    out_dir = np.stack([in_dir[:, perm[a]] * sign[a] for a in range(3)], axis=1)
    size = np.array(cfg.volume_shape, dtype=float)
    spacing = float(cfg.spacing)
    in_spacing = np.array(reference.GetSpacing())
    half_span = (size - 1) / 2.0 * spacing  # mm from the centre to the first output voxel
    centre_vox = (np.array(mask.shape) - 1) / 2.0
    if cfg.center == "brain" and mask.any():
        # keep the image centre where the brain fits the window; otherwise shift as
        # little as needed to cover it, or centre on it when it is larger than the window
        idx = np.argwhere(mask)
        bmin, bmax = idx.min(0).astype(float), idx.max(0).astype(float)
        for a in range(3):
            ax = perm[a]
            hw = half_span[a] / in_spacing[ax]
            if bmax[ax] - bmin[ax] <= 2 * hw:
                centre_vox[ax] = np.clip(centre_vox[ax], bmax[ax] - hw, bmin[ax] + hw)
            else:
                centre_vox[ax] = (bmin[ax] + bmax[ax]) / 2.0
    # snap the centre so that output voxel centres fall on input voxel centres
    # whenever the target spacing is a whole multiple of the input spacing
    for a in range(3):
        ax = perm[a]
        step = spacing / in_spacing[ax]
        if abs(step - round(step)) < 1e-6:
            ratio = half_span[a] / in_spacing[ax]
            centre_vox[ax] = np.round(centre_vox[ax] - ratio) + ratio
    centre_phys = np.array(
        reference.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in centre_vox))
    )
    origin = centre_phys - out_dir @ half_span
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing((spacing,) * 3)
    grid.SetDirection(tuple(out_dir.ravel()))
    grid.SetOrigin(tuple(origin))
    return grid


def _resample(img: sitk.Image, grid: sitk.Image, interp: int) -> np.ndarray:
    out = sitk.Resample(img, grid, sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
    return from_sitk(out)


@dataclass
class PreparedVolume:
    """A scan on the model grid, with what is needed to map results back."""

    name: str
    image: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    brain_mask: np.ndarray  # (X, Y, Z) bool
    segmentation: np.ndarray | None  # (X, Y, Z) bool
    grid: sitk.Image  # the model grid (geometry only)
    input_reference: nib.Nifti1Image | None = None  # the input file's grid, header, affine

    @property
    def affine(self) -> np.ndarray:
        """Affine of the model grid (for writing model-space volumes)."""
        return grid_affine(self.grid)

    def to_input_space(self, volume: np.ndarray, labels: bool = False) -> np.ndarray:
        """Resample a model-grid volume back onto the input file's voxel grid."""
        if self.input_reference is None:
            raise ValueError(f"{self.name}: no input reference to map back to")
        if volume.shape != self.image.shape:
            raise ValueError(
                f"{self.name}: volume {volume.shape} is not on the model grid {self.image.shape}"
            )
        src = to_sitk(volume.astype(np.float32), self.affine)
        ref = to_sitk(
            np.zeros(self.input_reference.shape[:3], np.float32), self.input_reference.affine
        )
        return _resample(src, ref, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear)


def _voxel_size(affine: np.ndarray) -> str:
    return "x".join(f"{v:g}" for v in np.linalg.norm(affine[:3, :3], axis=0))


def prepare_volume(
    image: nib.Nifti1Image,
    mask: nib.Nifti1Image | None,
    seg: nib.Nifti1Image | None,
    cfg: DataConfig,
    name: str = "volume",
) -> PreparedVolume:
    """Bring one scan (with optional brain mask and lesion labels) onto the model grid."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine
    for kind, other in (("brain mask", mask), ("segmentation", seg)):
        if other is not None and other.shape[:3] != data.shape:
            raise DataError(
                f"{name}: {kind} shape {other.shape[:3]} differs from image shape {data.shape}"
            )
    m = np.asarray(mask.dataobj) > 0 if mask is not None else data > 0
    if not m.any():
        raise DataError(
            f"{name}: the brain mask is empty"
            if mask is not None
            else f"{name}: the image has no voxel > 0 (no brain mask given)"
        )
    if cfg.curvature_flow:  # images only; masks and labels are never smoothed
        data = curvature_flow(data)
    try:
        data = rescale_percentiles(data, m, *cfg.percentiles)
    except DataError as e:
        raise DataError(f"{name}: {e}") from e
    ref = to_sitk(data, affine)
    grid = model_grid(ref, m, affine, cfg)
    img = np.clip(_resample(ref, grid, sitk.sitkBSpline), 0.0, 1.0)
    mk = _resample(to_sitk(m.astype(np.float32), affine), grid, sitk.sitkNearestNeighbor) > 0.5
    sg = None
    if seg is not None:
        sg = (
            _resample(
                to_sitk((np.asarray(seg.dataobj) > 0).astype(np.float32), affine),
                grid,
                sitk.sitkNearestNeighbor,
            )
            > 0.5
        )
    if not mk.any():
        raise DataError(
            f"{name}: the brain covers no voxel of the model grid ({cfg.spacing:g} mm voxels); "
            f"the scan (shape {data.shape}, voxel size {_voxel_size(affine)} mm) is too small"
        )
    img = (img * mk).astype(np.float32)
    if cfg.standardise == "nyul":
        if not cfg.landmarks:
            raise DataError(
                f"{name}: data.standardise='nyul' needs data.landmarks (learned by training)"
            )
        img = nyul_standardise(img, mk, cfg.landmarks)
    return PreparedVolume(name, img, mk, sg, grid, image)


# ------------------------------------------------------------------ histogram standardisation


def nyul_landmarks(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The volume's intensity percentiles NYUL_PERCENTILES inside the brain."""
    return np.percentile(image[mask > 0], NYUL_PERCENTILES).astype(np.float64)


def learn_landmarks(volumes) -> tuple[float, ...]:
    """Standard scale of Nyul & Udupa (2000), in the [0, 1] units the volumes are
    already in after the percentile rescale: the mean of the volumes' landmarks."""
    lm = np.mean([nyul_landmarks(v.image, v.brain_mask) for v in volumes], axis=0)
    return tuple(round(float(x), 6) for x in np.maximum.accumulate(lm))


def nyul_standardise(
    image: np.ndarray, mask: np.ndarray, landmarks: tuple[float, ...] | np.ndarray
) -> np.ndarray:
    """Map the brain intensities piecewise-linearly so that the volume's own landmarks
    land on `landmarks`; beyond the outer landmarks the end segments are extended.
    Voxels outside the mask stay 0; the result is clipped to [0, 1]."""
    src = nyul_landmarks(image, mask)
    src = src + np.arange(len(src)) * 1e-9  # strictly increasing
    curve = interp1d(src, np.asarray(landmarks, np.float64), fill_value="extrapolate")
    out = curve(image)
    return (np.clip(out, 0.0, 1.0) * (mask > 0)).astype(np.float32)
