"""An offline synthetic brain benchmark in pDDPM's layout.

Made from data that ships inside nilearn's wheel: the skull-stripped MNI152 (2009)
template's grey- and white-matter probability maps and brain mask, at 2 mm. Every
subject is the template warped by a random smooth deformation and a small random
affine, given T2-like contrast (CSF bright, grey matter intermediate, white matter
dark) with per-subject tissue intensities, texture, a smooth multiplicative bias
field, Rician noise and an arbitrary scanner gain. Diseased subjects get

- tumours (BraTS-like): an irregular core, a surrounding hyperintense oedema, an
  optional fluid-bright necrotic centre and mass effect (tissue pushed outwards);
- multiple-sclerosis-like white-matter hyperintensities (MSLUB-like): several small
  ellipsoids inside white matter.

Sites (`SynthConfig.site`): "a" is the default benchmark; "b" is a second scanner
for "train on site A, test on site B": other subjects, the same generator, then a
different acquisition: a monotone contrast curve (a flatter, proton-density-like T2:
white and grey matter much closer to CSF, lesions moved with the tissue intensities
they lie between), a
stronger bias field, more noise and thicker slices (blurred through-plane and
slightly in-plane), and another scanner gain.

Ground truth is exact: the lesion occupancy that is blended into the image,
thresholded at 0.5 (BraTS "whole tumour": oedema, core and necrosis together).
Volumes are 96x96x50 at 2 mm (RAS), written as NIfTI with brain masks and split
CSVs in pDDPM's layout, so training and evaluation read them like the real data.
Everything is deterministic for a seed: subject i of a kind uses its own
generator seeded by (seed, kind, i), whatever the order or number of processes.
"""

from __future__ import annotations

import csv
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ..outputs import check_own_folder, clean_stale, exit_with_parent, partial_path, record_outputs
from .io import DataError

SHAPE = (96, 96, 50)
KINDS = {"healthy": 0, "tumour": 1, "ms": 2}


@dataclass(frozen=True)
class Site:
    """Acquisition of one synthetic site (tissue units: CSF ~0.94, GM ~0.54, WM ~0.35)."""

    contrast: tuple[tuple[float, ...], tuple[float, ...]] | None  # curve knots (x, y)
    bias: tuple[float, float]  # std range of the log bias field
    noise: tuple[float, float]  # Rician sigma range
    blur: tuple[float, float, float]  # Gaussian sigma (voxels) per axis: resolution
    gain: tuple[float, float]  # scanner units


SITES = {
    "a": Site(None, (0.05, 0.15), (0.01, 0.025), (0.0, 0.0, 0.0), (300.0, 1500.0)),
    "b": Site(
        ((0.0, 0.35, 0.54, 0.94, 1.2), (0.0, 0.40, 0.55, 0.73, 0.85)),
        (0.2, 0.3),
        (0.025, 0.04),
        (0.6, 0.6, 1.0),
        (2000.0, 5000.0),
    ),
}


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    site: str = "a"  # acquisition: a key of SITES
    healthy_trainval: int = 120  # pool split into 5 folds: 96 train / 24 val each
    healthy_test: int = 8
    tumour_val: int = 8
    tumour_test: int = 16
    ms_val: int = 8
    ms_test: int = 12
    workers: int = 2

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site {self.site!r} must be one of {sorted(SITES)}")


# --------------------------------------------------------------------------- template


@lru_cache(maxsize=1)
def template() -> dict[str, np.ndarray]:
    """GM, WM, brain mask of MNI152 at 2 mm, cropped to SHAPE around the brain, and the affine."""
    try:
        from nilearn import datasets
    except ImportError as e:  # pragma: no cover - nilearn is a core dependency
        raise DataError("the synthetic benchmark needs nilearn (pip install nilearn)") from e
    gm_img = datasets.load_mni152_gm_template(resolution=2)
    gm = np.asarray(gm_img.get_fdata(), np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[2]):  # close small gaps near the skull base, slice by slice
        mask[:, :, z] = ndimage.binary_fill_holes(
            ndimage.binary_closing(mask[:, :, z], iterations=2)
        )
    mask = mask.astype(np.float32)
    idx = np.argwhere(mask > 0.5)
    centre = np.round((idx.min(0) + idx.max(0)) / 2).astype(int)
    start = centre - np.array(SHAPE) // 2
    start[2] += 3  # keep a little more of the upper brain: drop more inferior slices
    aff = gm_img.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ start + aff[:3, 3]
    return {"gm": gm, "wm": wm, "mask": mask, "start": start, "affine": aff}


@cache
def _zoom_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): the linear map of a 1-D cubic-spline zoom (ndimage.zoom, order 3,
    mode "nearest") from n_in to n_out samples, column i the zoom of unit vector i."""
    eye = np.eye(n_in)
    cols = [ndimage.zoom(eye[i], n_out / n_in, order=3, mode="nearest") for i in range(n_in)]
    return np.stack(cols, axis=1)[:n_out]


def _smooth_field(rng: np.random.Generator, coarse: tuple[int, int, int], amp: float) -> np.ndarray:
    """Smooth random field of SHAPE: random coarse grid, cubic upsampling, unit std * amp.

    The 3-D spline zoom is a tensor product of 1-D ones, so it is computed as three
    small matrix products: the same field as ndimage.zoom of the grid (to 1e-14), 20
    times faster."""
    g = rng.standard_normal(coarse)
    m = [_zoom_matrix(c, s) for c, s in zip(coarse, SHAPE)]
    f = np.einsum("ai,bj,ck,ijk->abc", *m, g, optimize=True)
    f -= f.mean()
    return (amp * f / (f.std() + 1e-8)).astype(np.float32)


def _grid() -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"))


def _sampling_coords(
    rng: np.random.Generator, push: list[tuple[np.ndarray, float, float]]
) -> np.ndarray:
    """Template voxel coordinates for each output voxel: random affine + smooth warp
    (+ radial mass effect around each (centre, amplitude, sigma) in `push`)."""
    t = template()
    x = _grid()  # (3, X, Y, Z) output voxel coordinates
    c = (np.array(SHAPE, np.float32) - 1)[:, None, None, None] / 2
    ang = np.deg2rad(rng.uniform(-6, 6))
    tilt = np.deg2rad(rng.uniform(-4, 4))
    rz = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    A = (rz @ rx @ np.diag(rng.uniform(0.92, 1.08, 3))).astype(np.float32)
    y = np.einsum("ij,j...->i...", A, x - c) + c
    y += rng.uniform(-2, 2, 3).astype(np.float32)[:, None, None, None]
    amp = rng.uniform(1.0, 2.5)
    y += np.stack([_smooth_field(rng, (5, 5, 4), amp) for _ in range(3)])
    for centre, m, sigma in push:
        d = x - centre[:, None, None, None]
        r = np.sqrt((d**2).sum(0)) + 1e-3
        y -= (
            m * np.exp(-(r**2) / (2 * sigma**2)) * d / r
        )  # sample closer to the centre: tissue moves out
    return y + t["start"].astype(np.float32)[:, None, None, None]


def _warp(vol: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0).astype(
        np.float32
    )


def _blend(img: np.ndarray, w: np.ndarray, value: np.ndarray | float) -> np.ndarray:
    return img * (1 - w) + w * value


def _occupancy(dist: np.ndarray, radius: float, edge: float = 1.0) -> np.ndarray:
    """Soft ball: 1 inside `radius`, 0 outside, a linear ramp of `edge` voxels between."""
    return np.clip((radius - dist) / edge + 0.5, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- lesions


def _tumour_plan(rng: np.random.Generator, tissue: np.ndarray) -> dict:
    r_core = rng.uniform(4.0, 8.5)
    r_oedema = r_core * rng.uniform(1.35, 1.9)
    inner = ndimage.binary_erosion(tissue > 0.5, iterations=int(r_core * 0.8))
    inner[:, :, :8] = False
    inner[:, :, -8:] = False
    cands = np.argwhere(inner)
    if len(cands) == 0:
        cands = np.argwhere(tissue > 0.5)
    centre = cands[rng.integers(len(cands))].astype(np.float32)
    return {
        "centre": centre,
        "r_core": r_core,
        "r_oedema": r_oedema,
        "necrosis": bool(rng.random() < 0.5),
        "r_necrosis": r_core * rng.uniform(0.35, 0.6),
        "push": r_core * rng.uniform(0.3, 0.8),
    }


def _add_tumour(
    rng: np.random.Generator, img: np.ndarray, brain: np.ndarray, wm: np.ndarray, plan: dict
) -> tuple[np.ndarray, np.ndarray]:
    x = _grid()
    d = np.sqrt(((x - plan["centre"][:, None, None, None]) ** 2).sum(0))
    wobble = 1 + _smooth_field(rng, (16, 16, 10), 0.22)  # irregular outline
    d = d / np.clip(wobble, 0.5, 1.7)
    # oedema spreads further along white matter than through grey matter
    d_oed = d / (0.75 + 0.5 * ndimage.gaussian_filter(wm, 1.0))
    w_oed = _occupancy(d_oed, plan["r_oedema"], 2.0) * brain
    w_core = _occupancy(d, plan["r_core"], 1.0) * brain
    oedema_val = rng.uniform(0.72, 0.88)
    core_val = rng.uniform(0.55, 0.8) + _smooth_field(rng, (12, 12, 8), 0.07)
    img = _blend(img, w_oed, oedema_val)
    img = _blend(img, w_core, core_val)
    if plan["necrosis"]:
        img = _blend(img, _occupancy(d, plan["r_necrosis"], 1.0) * brain, rng.uniform(0.9, 1.0))
    return img, (w_oed > 0.5) & (brain > 0.5)


def _add_ms(
    rng: np.random.Generator,
    img: np.ndarray,
    wm: np.ndarray,
    brain: np.ndarray,
    drawn: list[dict] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """White-matter lesions; `drawn` receives one record per lesion (centre in voxels,
    its own voxel count: lesions can touch and merge in the ground truth)."""
    x = _grid()
    seg = np.zeros(SHAPE, bool)
    cands = np.argwhere((wm > 0.75) & (brain > 0.5))
    n = int(rng.integers(4, 13))
    for _ in range(n):
        c = cands[rng.integers(len(cands))].astype(np.float32)
        radii = rng.uniform(1.0, 2.6) * rng.uniform(1.0, 1.8, 3)
        d = np.sqrt((((x - c[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
        w = _occupancy(d, 1.0, 0.5) * brain
        img = _blend(img, w, rng.uniform(0.68, 0.85))
        seg |= w > 0.5
        if drawn is not None:
            own = int(((w > 0.5) & (brain > 0.5)).sum())
            drawn.append({"kind": "ms", "centre": c.tolist(), "voxels": own})
    return img, seg & (brain > 0.5)


# --------------------------------------------------------------------------- one subject


def make_subject(seed: int, kind: str, index: int, site: str = "a") -> dict:
    """One synthetic subject: image (scanner units), brain mask, lesion mask (uint8),
    and `lesions`: what was drawn per lesion (kind, centre in voxel indices, voxels of
    its own ground truth; a tumour's oedema, core and necrosis are one lesion)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} must be one of {sorted(KINDS)}")
    if site not in SITES:
        raise ValueError(f"site {site!r} must be one of {sorted(SITES)}")
    acq = SITES[site]
    # site "a" keeps the seeds of the original benchmark; other sites draw other subjects
    key = [seed, KINDS[kind], index] + ([] if site == "a" else [1000 + sorted(SITES).index(site)])
    rng = np.random.default_rng(key)
    t = template()
    push = []
    plan = None
    if kind == "tumour":
        coords0 = _sampling_coords(np.random.default_rng([*key, 1]), [])
        tissue0 = _warp(t["gm"], coords0) + _warp(t["wm"], coords0)
        plan = _tumour_plan(rng, tissue0)
        push = [(plan["centre"], plan["push"], plan["r_oedema"])]
    coords = _sampling_coords(np.random.default_rng([*key, 1]), push)
    gm, wm, brain = (_warp(t[k], coords) for k in ("gm", "wm", "mask"))
    brain = (brain > 0.5).astype(np.float32)
    gm, wm = gm * brain, wm * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    v_csf, v_gm, v_wm = rng.uniform(0.88, 1.0), rng.uniform(0.48, 0.6), rng.uniform(0.3, 0.4)
    texture = 1 + _smooth_field(rng, (24, 24, 12), 0.035)
    img = (csf * v_csf + gm * v_gm + wm * v_wm) * texture
    seg = np.zeros(SHAPE, bool)
    drawn: list[dict] = []
    if kind == "tumour":
        img, seg = _add_tumour(rng, img, brain, wm, plan)
        drawn.append(
            {
                "kind": "tumour",
                "centre": plan["centre"].tolist(),
                "voxels": int(seg.sum()),
                "necrosis": plan["necrosis"],
            }
        )
    elif kind == "ms":
        img, seg = _add_ms(rng, img, wm, brain, drawn)
    if acq.contrast is not None:
        img = np.interp(img, *acq.contrast)
    img = img * np.exp(_smooth_field(rng, (3, 3, 3), rng.uniform(*acq.bias)))  # bias field
    if any(acq.blur):
        img = ndimage.gaussian_filter(img, acq.blur)
    sigma = rng.uniform(*acq.noise)
    img = np.sqrt(
        (img + sigma * rng.standard_normal(SHAPE)) ** 2 + (sigma * rng.standard_normal(SHAPE)) ** 2
    )
    img = (img * brain * rng.uniform(*acq.gain)).astype(np.float32)
    return {
        "image": img,
        "mask": brain.astype(np.uint8),
        "seg": seg.astype(np.uint8),
        "lesions": drawn,
    }


# --------------------------------------------------------------------------- the benchmark on disk

_LAYOUT = {
    "healthy": ("Train/ixi", "IXI{:03d}-SYN-{:04d}"),
    "tumour": ("Test/Brats21", "BraTS2021_S{:04d}"),
    "ms": ("Test/MSLUB", "synpatient{:02d}"),
}


def _subject_name(kind: str, i: int) -> str:
    pattern = _LAYOUT[kind][1]
    return pattern.format(900 + i, i) if kind == "healthy" else pattern.format(i)


LESION_FIELDS = [
    "subject",
    "dataset",
    "lesion",
    "kind",
    "x_mm",
    "y_mm",
    "z_mm",
    "voxels",
    "volume_ml",
    "necrosis",
]


def _write_subject(args: tuple[Path, int, str, int, str]) -> list[dict]:
    """Write one subject's files; returns its rows of lesions.csv (world mm, RAS)."""
    root, seed, kind, i, site = args
    folder, _ = _LAYOUT[kind]
    name = _subject_name(kind, i)
    vols = make_subject(seed, kind, i, site)
    aff = template()["affine"]
    base = root / folder
    outs = [("t2", vols["image"], np.float32), ("mask", vols["mask"], np.uint8)]
    if kind != "healthy":
        outs.append(("seg", vols["seg"], np.uint8))
    for sub, data, dtype in outs:
        img = nib.Nifti1Image(data.astype(dtype), aff)
        img.header.set_xyzt_units("mm")
        img.header.set_qform(aff, code=1)
        img.header.set_sform(aff, code=1)
        (base / sub).mkdir(parents=True, exist_ok=True)
        nib.save(img, str(base / sub / f"{name}_{sub}.nii.gz"))
    voxel_ml = float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0
    rows = []
    for n, les in enumerate(vols["lesions"], 1):
        x, y, z = (aff @ np.array([*les["centre"], 1.0]))[:3]
        rows.append(
            {
                "subject": f"{name}_t2",  # the image's stem, as the evaluation names it
                "dataset": folder.split("/")[-1],
                "lesion": n,
                "kind": les["kind"],
                "x_mm": round(float(x), 2),
                "y_mm": round(float(y), 2),
                "z_mm": round(float(z), 2),
                "voxels": les["voxels"],
                "volume_ml": round(les["voxels"] * voxel_ml, 4),
                "necrosis": les.get("necrosis", ""),
            }
        )
    return rows


def _csv_rows(kind: str, indices: list[int]) -> list[dict]:
    folder, _ = _LAYOUT[kind]
    rows = []
    for i in indices:
        n = _subject_name(kind, i)
        rows.append(
            {
                "": i,
                "img_name": f"{n}_t1.nii.gz" if kind == "healthy" else n,
                "age": "",
                "label": int(kind != "healthy"),
                "img_path": f"/{folder}/t1/{n}_t1.nii.gz",
                "mask_path": f"/{folder}/mask/{n}_mask.nii.gz",
                "seg_path": f"/{folder}/seg/{n}_seg.nii.gz" if kind != "healthy" else "",
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or ["", "img_name", "age", "label", "img_path", "mask_path", "seg_path"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_splits(root: Path, cfg: SynthConfig) -> None:
    sp = root / "splits"
    sp.mkdir(parents=True, exist_ok=True)
    pool = list(range(cfg.healthy_trainval))
    folds = np.array_split(np.random.default_rng([cfg.seed, 99]).permutation(pool), 5)
    for k in range(5):
        val = sorted(int(i) for i in folds[k])
        train = [i for i in pool if i not in set(val)]
        _write_csv(sp / f"IXI_train_fold{k}.csv", _csv_rows("healthy", train))
        _write_csv(sp / f"IXI_val_fold{k}.csv", _csv_rows("healthy", val))
    test = list(range(cfg.healthy_trainval, cfg.healthy_trainval + cfg.healthy_test))
    _write_csv(sp / "IXI_test.csv", _csv_rows("healthy", test))
    names = [f"{_subject_name('healthy', i)}_t2.nii.gz" for i in pool + test]
    _write_csv(sp / "avail_t2.csv", [{"": j, "0": n} for j, n in enumerate(names)], ["", "0"])
    for kind, ds, nv, nt in (
        ("tumour", "Brats21", cfg.tumour_val, cfg.tumour_test),
        ("ms", "MSLUB", cfg.ms_val, cfg.ms_test),
    ):
        _write_csv(sp / f"{ds}_val.csv", _csv_rows(kind, list(range(nv))))
        _write_csv(sp / f"{ds}_test.csv", _csv_rows(kind, list(range(nv, nv + nt))))


def generate_benchmark(
    out_dir: str | Path,
    cfg: SynthConfig = SynthConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the benchmark to `out_dir` (pDDPM layout). Built in a temporary sibling
    folder (.NAME.HOST-PID.partial) and renamed into place, so an interrupted run leaves
    nothing half-written; the next call removes what a killed one left (outputs.py)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(
                f"{out} exists and is not empty; choose another folder or pass overwrite"
            )
        # the whole folder is replaced: only one that synth wrote (outputs.py)
        check_own_folder(out, "synth", marks=("synthetic.json",))
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = partial_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n = {
            "healthy": cfg.healthy_trainval + cfg.healthy_test,
            "tumour": cfg.tumour_val + cfg.tumour_test,
            "ms": cfg.ms_val + cfg.ms_test,
        }
        jobs = [(tmp, cfg.seed, kind, i, cfg.site) for kind in n for i in range(n[kind])]
        template()  # load once before forking workers
        bar = tqdm(total=len(jobs), desc="synthesising", unit="vol", disable=not progress)
        lesions: list[dict] = []
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers, initializer=exit_with_parent) as ex:
                for rows in ex.map(_write_subject, jobs, chunksize=4):
                    lesions += rows
                    bar.update()
        else:
            for j in jobs:
                lesions += _write_subject(j)
                bar.update()
        bar.close()
        write_splits(tmp, cfg)
        # what was drawn per lesion, so that results can be split by kind, size, place
        _write_csv(tmp / "lesions.csv", lesions, LESION_FIELDS)
        (tmp / "synthetic.json").write_text(
            json.dumps(
                {
                    "generator": "maediff synthetic brain benchmark",
                    "shape": SHAPE,
                    "spacing_mm": 2.0,
                    **asdict(cfg),
                },
                indent=2,
            )
        )
        record_outputs(tmp, "synth", ["*"])  # the folder is synth's, whole
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
