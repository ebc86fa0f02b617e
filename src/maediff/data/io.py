"""NIfTI input and output with nibabel, keeping affine and header, and `Subject`, the
files of one scan (data/splits.py and data/bids.py find them).

Every failure names the file and the problem; every write goes to a temporary
file first and is renamed into place, so no half-written output is left behind.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..memory import host_memory_available
from ..outputs import owner_tag, temp_path


class DataError(ValueError):
    """A data file that cannot be used, with the file named in the message."""


@dataclass(frozen=True)
class Subject:
    """One scan: its image, and its brain mask and lesion segmentation where it has them."""

    name: str
    image: Path
    mask: Path | None = None
    seg: Path | None = None
    label: int = 0  # 0 healthy, 1 with lesions
    folder: str | None = None  # BIDS: the scan's folder in its data set (sub-01/ses-1/anat)


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without .nii / .nii.gz."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


def load_nifti(path: str | Path, kind: str = "image") -> nib.Nifti1Image:
    """Load a 3-D NIfTI file and check it: exists, readable, 3-D (a trailing axis of
    length 1 is dropped), finite. The voxel data are read here, so a truncated archive
    fails here and not later."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{kind} file {path} does not exist")
    if not is_nifti(path):
        raise DataError(f"{kind} file {path} is not a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        check_header(img, path, kind)
        data = np.asanyarray(img.dataobj)
    except DataError:
        raise
    except MemoryError as e:
        raise DataError(f"{kind} file {path} does not fit in memory") from e
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{kind} file {path} is unreadable or truncated: {_line(e)}") from e
    except Exception as e:  # nibabel raises several types for malformed headers
        raise DataError(f"{kind} file {path} is not a valid NIfTI image: {_line(e)}") from e
    if data.dtype.names is not None:  # RGB24 / RGBA32: colour, not an MR intensity
        raise DataError(
            f"{kind} file {path} holds colour voxels ({', '.join(data.dtype.names)}); "
            "a single-channel (grey) volume is required"
        )
    if np.iscomplexobj(data):  # complex MR data: the magnitude image (data/checks.py flags it)
        data = np.abs(data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{kind} file {path} has {data.ndim} dimensions {tuple(data.shape)}; a 3-D volume is required"
        )
    # float32 is what the volumes are computed in: beyond its range is Inf there
    big = float(np.finfo(np.float32).max)
    if np.issubdtype(data.dtype, np.floating) and not (np.abs(data) <= big).all():
        n = int((~(np.abs(data) <= big)).sum())
        # nibabel keeps the header's scaling on the data proxy
        slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
        raw = img.get_data_dtype()
        if (slope, inter) != (1.0, 0.0) and np.issubdtype(raw, np.integer):
            raise DataError(
                f"{kind} file {path}: its header's scaling (scl_slope {slope:g}, scl_inter "
                f"{inter or 0:g}) takes {n} of its {raw} voxels beyond the float range; "
                "correct scl_slope in the header"
            )
        raise DataError(f"{kind} file {path} contains {n} NaN or Inf voxels")
    if data is not img.dataobj:
        img = nib.Nifti1Image(np.asarray(data), img.affine, img.header)
    return img


def _line(e: BaseException) -> str:
    """A library's message on one line (nibabel's span several), or its type."""
    return (
        " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
    )


def check_header(img: nib.Nifti1Image, path: Path, kind: str) -> None:
    """What the header promises, before the voxels are read: a finite affine with three
    independent axes, and a volume that fits in the memory available (a small .gz can
    declare and expand to more than the machine holds)."""
    affine = img.affine
    if not np.isfinite(affine).all():
        raise DataError(f"{kind} file {path} has NaN or Inf in its affine (voxel-to-world) matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(
            f"{kind} file {path} has a degenerate affine (an axis of zero length or two parallel axes)"
        )
    need = int(np.prod(img.shape, dtype=np.float64)) * img.get_data_dtype().itemsize
    free = host_memory_available()
    if free is not None and need > free:
        raise DataError(
            f"{kind} file {path} declares a {'x'.join(map(str, img.shape))} volume of "
            f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory available"
        )


def save_like(
    data: np.ndarray, reference: nib.Nifti1Image, path: str | Path, dtype: type = np.float32
) -> Path:
    """Write `data` (in the reference's voxel grid) with the reference's affine and
    header: float maps as float32 with scaling reset, masks as uint8. Atomic."""
    path = Path(path)
    if data.shape != reference.shape[:3]:
        raise DataError(
            f"cannot write {path}: data shape {data.shape} differs from the reference grid {reference.shape[:3]}"
        )
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header)
    out.header.set_slope_inter(1.0, 0.0) if np.issubdtype(
        np.dtype(dtype), np.floating
    ) else out.header.set_slope_inter(None, None)
    return atomic_save(out, path)


def atomic_save(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Write through a temporary name and one rename; a `path` that is itself this
    process's temporary name (a caller that renames several files together) is written
    as it is. A failed write is one error naming the file."""
    path = Path(path)
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    staged = path.name.startswith(".") and f".{owner_tag()}.tmp" in path.name
    tmp = path if staged else temp_path(path, suffix)  # .NAME.HOST-PID.tmp.nii.gz: a dot-file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(tmp))
        if not staged:
            tmp.replace(path)
    except OSError as e:
        final = _final_name(path) if staged else path
        raise OSError(f"cannot write {final}: {e.strerror or _line(e)}") from e
    finally:
        if not staged and tmp.exists():
            tmp.unlink()
    return path


def _final_name(tmp: Path) -> Path:
    """.NAME.HOST-PID.tmp[.EXT] -> NAME, the file a temporary name stands for."""
    return tmp.with_name(tmp.name[1:].split(f".{owner_tag()}.tmp")[0])
