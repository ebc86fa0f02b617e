"""Which scans belong to which split.

Two ways in, both giving a list of `Subject`:

- pDDPM's layout (docs/data.md §1): `DATA_DIR/Train/ixi/{t2,mask}`,
  `DATA_DIR/Test/{Brats21,MSLUB}/{t2,mask,seg}` and `DATA_DIR/splits/*.csv` as the
  pDDPM authors share them. The CSVs list T1 paths; the T2 file is found by
  rewriting the folder `/t1/` to `/t2/` and the suffix `_t1.nii` to `_t2.nii` (only
  those two places, so names such as `patient13` stay intact). IXI rows are kept only
  when `avail_t2.csv` lists their T2 file. Duplicate rows are kept, for parity.
- Your own scans: a folder of NIfTI files with optional `NAME_mask.nii.gz` and
  `NAME_seg.nii.gz` companions, or a CSV with columns image[, mask][, seg] (paths
  relative to the CSV's folder or absolute).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..outputs import safe_name
from .bids import is_bids, read_bids
from .io import NIFTI_SUFFIXES, DataError, Subject, is_nifti, nifti_stem

DATASETS = {"ixi": "IXI", "brats21": "Brats21", "mslub": "MSLUB"}
SPLITS = ("train", "val", "test")


def canonical_dataset(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS.values())}")
    return DATASETS[key]


def split_csv_name(dataset: str, split: str, fold: int = 0) -> str:
    ds = canonical_dataset(dataset)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if ds == "IXI":
        return "IXI_test.csv" if split == "test" else f"IXI_{split}_fold{fold}.csv"
    if split == "train":
        raise ValueError(f"{ds} has no training split (train on IXI)")
    return f"{ds}_{split}.csv"


def t1_to_t2(path: str) -> str:
    """pDDPM CSV path of a T1 file -> its T2 file (folder and suffix only)."""
    return path.replace("/t1/", "/t2/").replace("_t1.nii", "_t2.nii")


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise DataError(f"split file {path} does not exist")
    try:
        # utf-8-sig: a byte-order mark (a spreadsheet's "CSV UTF-8") is not part of the first column's name
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"split file {path} cannot be read as CSV: {e}") from e


def _resolve(data_dir: Path, p: str) -> Path:
    return data_dir / p.lstrip("/")


def read_pddpm_split(
    data_dir: str | Path,
    dataset: str,
    split: str,
    fold: int = 0,
    splits_dir: str | Path | None = None,
    check_files: bool = True,
) -> list[Subject]:
    """Subjects of one split of pDDPM's layout, T2 images, in CSV order."""
    data_dir = Path(data_dir)
    splits_dir = Path(splits_dir) if splits_dir is not None else data_dir / "splits"
    ds = canonical_dataset(dataset)
    csv_path = splits_dir / split_csv_name(ds, split, fold)
    rows = _read_rows(csv_path)
    for col in ("img_path", "mask_path"):
        if rows and col not in rows[0]:
            raise DataError(f"split file {csv_path} has no column {col!r}")
    if ds == "IXI":
        avail = {r.get("0", "") for r in _read_rows(splits_dir / "avail_t2.csv")}
        rows = [r for r in rows if Path(t1_to_t2(r["img_path"])).name in avail]
    subjects = []
    for r in rows:
        img = _resolve(data_dir, t1_to_t2(r["img_path"]))
        mask = _resolve(data_dir, r["mask_path"]) if r.get("mask_path") else None
        seg = _resolve(data_dir, r["seg_path"]) if r.get("seg_path") else None
        label = int(float(r.get("label") or 0))
        subjects.append(Subject(nifti_stem(img), img, mask, seg, label))
    if check_files:
        check_exist(subjects, f"split file {csv_path}")
    return subjects


def check_exist(subjects: list[Subject], source: str) -> None:
    missing = [
        str(p)
        for s in subjects
        for p in (s.image, s.mask, s.seg)
        if p is not None and not p.exists()
    ]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"{source} lists {len(missing)} file(s) that do not exist: {', '.join(missing[:5])}{more}"
        )


COMPANIONS = ("_mask", "_seg")


def _companion(scan: Path, suffix: str) -> Path | None:
    """NAME_mask / NAME_seg next to NAME (.nii or .nii.gz), if present."""
    stem = nifti_stem(scan)
    return next(
        (q for q in (scan.parent / f"{stem}{suffix}{ext}" for ext in NIFTI_SUFFIXES) if q.exists()),
        None,
    )


def subject_from_scan(scan: Path) -> Subject:
    """A scan with its mask and segmentation companions; label 1 when it has a segmentation."""
    mask, seg = (_companion(scan, c) for c in COMPANIONS)
    return Subject(nifti_stem(scan), scan, mask, seg, int(seg is not None))


def read_folder(folder: str | Path) -> list[Subject]:
    """NIfTI scans of a folder; NAME_mask / NAME_seg files are companions, not scans,
    and dot-files (the temporary files of a write in progress or killed) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if is_nifti(p) and not p.name.startswith("."))
    subjects = [subject_from_scan(p) for p in files if not nifti_stem(p).endswith(COMPANIONS)]
    if not subjects:
        raise DataError(f"no NIfTI scans (.nii, .nii.gz) in {folder}")
    return subjects


def read_subject_csv(path: str | Path) -> list[Subject]:
    """A CSV with an `image` column and optional `mask`, `seg` and `name` columns."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows or "image" not in rows[0]:
        raise DataError(f"subject list {path} needs an 'image' column and at least one row")
    base = path.parent

    def res(v: str | None) -> Path | None:
        return (base / v if not Path(v).is_absolute() else Path(v)) if v else None

    subjects = []
    for i, r in enumerate(rows, 2):  # line 1 is the header
        image = (r.get("image") or "").strip()
        if not image:
            raise DataError(f"subject list {path} line {i}: the 'image' cell is empty")
        name = (r.get("name") or "").strip() or nifti_stem(image)
        # the name starts output file names: it must not lead out of the output folder
        safe_name(name, f"subject list {path} line {i}")
        subjects.append(
            Subject(
                name, res(image), res(r.get("mask")), res(r.get("seg")), int(bool(r.get("seg")))
            )
        )
    check_exist(subjects, f"subject list {path}")
    return subjects


def read_inputs(
    path: str | Path,
    participants: dict[str, str] | None = None,
    lesions: bool | None = None,
    suffix: str = "T2w",
) -> list[Subject]:
    """A single NIfTI file, a folder of scans, a CSV subject list, or a BIDS data set
    (a folder with dataset_description.json; `participants`, `lesions` and the contrast
    `suffix` select its scans, see data/bids.py)."""
    p = Path(path)
    if is_bids(p):
        return read_bids(p, participants, lesions, suffix)
    if participants:
        raise DataError(f"--participants selects subjects of a BIDS data set; {p} is not one")
    if p.is_dir():
        return read_folder(p)
    if p.suffix == ".csv":
        return read_subject_csv(p)
    if not p.exists():
        raise DataError(f"input {p} does not exist")
    if not is_nifti(p):
        raise DataError(f"input {p} is not a NIfTI file, a folder or a CSV subject list")
    return [subject_from_scan(p)]
