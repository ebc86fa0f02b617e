"""The evaluation pipeline against the reference protocol (docs/evaluation.md §1-§4):
threshold search, volumes left out of means, every patch reconstructed for l1,
checks before work, no half-written output. Uses a small pDDPM layout written here
(24 x 24 x 12 volumes at 2 mm) and a model that reconstructs its input."""

import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from maediff.config import DataConfig, GeometryConfig, get_preset
from maediff.data.io import DataError
from maediff.evaluation import PooledVoxels, greedy_threshold_search
from maediff.models import AnomalyModel
from maediff.pipeline.evaluate import evaluate_model

SHAPE = (24, 24, 12)
AFF = np.diag([2.0, 2.0, 2.0, 1.0])
DATA_CFG = DataConfig(volume_shape=SHAPE, spacing=2.0, curvature_flow=False)
FIELDS = ["", "img_name", "label", "img_path", "mask_path", "seg_path"]


def _subject(rng, lesion: bool | None):
    """Image, mask and segmentation (None: no file; False: an all-zero file)."""
    X, Y, Z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    mask = (X / 0.8) ** 2 + (Y / 0.8) ** 2 + (Z / 1.1) ** 2 < 1
    img = (0.4 + 0.1 * np.sin(5 * X) * np.cos(4 * Y) + 0.03 * rng.random(SHAPE)) * mask
    seg = np.zeros(SHAPE, bool)
    if lesion:
        c = rng.uniform(-0.3, 0.3, 3)
        seg = ((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2 < 0.12) & mask
        img[seg] += 0.5
    return img.astype(np.float32), mask.astype(np.uint8), (None if lesion is None else seg)


def write_layout(root: Path, n_val=2, n_test=2, n_ixi=2, empty_seg_test=False, seed=0) -> Path:
    """pDDPM's layout (docs/data.md §1) with Brats21, MSLUB and IXI test."""
    rng = np.random.default_rng(seed)
    sp = root / "splits"
    sp.mkdir(parents=True)

    def save(folder, name, kind, data, dtype):
        p = root / folder / kind / f"{name}_{kind}.nii.gz"
        p.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data.astype(dtype), AFF), str(p))

    def subjects(folder, names, lesions):
        rows = []
        for i, (name, lesion) in enumerate(zip(names, lesions)):
            img, mask, seg = _subject(rng, lesion)
            save(folder, name, "t2", img, np.float32)
            save(folder, name, "mask", mask, np.uint8)
            if seg is not None:
                save(folder, name, "seg", seg, np.uint8)
            rows.append(
                {
                    "": i,
                    "img_name": name,
                    "label": int(bool(lesion)),
                    "img_path": f"/{folder}/t1/{name}_t1.nii.gz",
                    "mask_path": f"/{folder}/mask/{name}_mask.nii.gz",
                    "seg_path": f"/{folder}/seg/{name}_seg.nii.gz" if seg is not None else "",
                }
            )
        return rows

    def write(name, rows, fields=FIELDS):
        with (sp / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    for ds in ("Brats21", "MSLUB"):
        folder = f"Test/{ds}"
        names = [f"{ds.lower()}{i:02d}" for i in range(n_val + n_test)]
        lesions = [True] * (n_val + n_test)
        if empty_seg_test:
            lesions[-1] = False  # a test volume whose segmentation has no lesion voxel
        rows = subjects(folder, names, lesions)
        write(f"{ds}_val.csv", rows[:n_val])
        write(f"{ds}_test.csv", rows[n_val:])
    names = [f"IXI9{i:02d}-HH-0000" for i in range(n_ixi)]
    write("IXI_test.csv", subjects("Train/ixi", names, [None] * n_ixi))
    write("avail_t2.csv", [{"": i, "0": f"{n}_t2.nii.gz"} for i, n in enumerate(names)], ["", "0"])
    return root


class IdentityModel(AnomalyModel):
    """A model of the one contract (models/base.py), not registered: the reconstruction
    is the input, so every residual is 0. Records the brain masks it was given;
    `fail_after` calls it raises, `fail_after=0`: an AssertionError on any call."""

    registry_name = "identity"
    trainable = False

    def __init__(self, fail_after: int | None = None, skip_empty_patches: bool = True):
        base = get_preset("thresh")
        super().__init__(
            replace(
                base,
                name="identity",
                geometry=GeometryConfig(image_size=SHAPE[0], patch_size=8, stride=8, grid_size=8),
                inference=replace(base.inference, skip_empty_patches=skip_empty_patches),
                data=DATA_CFG,
            )
        )
        self.brain_masks: list = []
        self.fail_after = fail_after

    def reconstruct(
        self, slices, generator=None, batch_size=None, amp=None, progress=None, brain_mask=None
    ):
        if self.fail_after == 0:
            raise AssertionError("reconstruct must not be called")
        if self.fail_after is not None and len(self.brain_masks) >= self.fail_after:
            raise RuntimeError("model failed half-way")
        self.brain_masks.append(brain_mask)
        if progress is not None:
            progress(slices.shape[0])
        return slices.clone()


def _evaluate(model, data, out, **kw):
    kw = {"data_cfg": DATA_CFG, "n_jobs": 1, "progress": False, **kw}
    return evaluate_model(model, data, out, **kw)


# ------------------------------------------------------------------ threshold search


def _reference_find_best_val(x, y, val_range, max_steps, step=0, max_val=0, max_point=0):
    """pDDPM's recursive search (utils_eval.find_best_val), rewritten with its
    dice = 2 sum(P G) / (sum P + sum G); returns (max_val, max_point) as it does."""
    if step == max_steps:
        return max_val, max_point
    if val_range[0] == val_range[1]:
        val_range = (val_range[0], 1)
    bottom, top = val_range
    center = bottom + (top - bottom) * 0.5
    q_bottom = bottom + (top - bottom) * 0.25
    q_top = bottom + (top - bottom) * 0.75

    def dice(p, g):
        return 2 * np.sum(p & g) / (np.sum(p) + np.sum(g))

    val_bottom, val_top = dice(x > q_bottom, y), dice(x > q_top, y)
    if val_bottom >= val_top:
        if val_bottom >= max_val:
            max_val, max_point = val_bottom, q_bottom
        return _reference_find_best_val(
            x, y, (bottom, center), max_steps, step + 1, max_val, max_point
        )
    if val_top >= max_val:
        max_val, max_point = val_top, q_top
    return _reference_find_best_val(x, y, (center, top), max_steps, step + 1, max_val, max_point)


@pytest.mark.parametrize("levels", [4, 16, 1000, None])
@pytest.mark.parametrize("seed", range(3))
def test_threshold_search_equals_the_reference(seed, levels):
    # pooled validation volumes; scores quantised to `levels` values (exact ties) or not
    rng = np.random.default_rng(seed)
    pool, xs, ys = PooledVoxels(), [], []
    for _ in range(3):
        lab = rng.random((12, 12, 6)) < 0.15
        sc = rng.random(lab.shape) * 0.6 + lab * rng.random(lab.shape) * 0.5
        sc[rng.random(lab.shape) < 0.3] = 0.0  # zero scores (outside the eroded mask)
        if levels:
            sc = np.round(sc * levels) / levels
        sc = sc.astype(np.float32)
        pool.add(sc, lab)
        xs.append(sc.ravel())
        ys.append(lab.ravel())
    x, y = np.concatenate(xs), np.concatenate(ys)
    ref_dice, ref_t = _reference_find_best_val(x, y, (0, float(np.max(x))), 10)
    t, d = greedy_threshold_search(pool, steps=10)
    assert (t, d) == (ref_t, ref_dice)


# ------------------------------------------------------------------ checks before any work


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "splits/avail_t2.csv").unlink(), "avail_t2.csv does not exist"),
        (lambda root: (root / "splits/MSLUB_test.csv").unlink(), "MSLUB_test.csv does not exist"),
        (
            lambda root: (root / "Test/MSLUB/seg/mslub03_seg.nii.gz").unlink(),
            r"MSLUB_test.csv lists 1 file\(s\) that do not exist: .*mslub03_seg",
        ),
        (lambda root: (root / "Train/ixi/t2").rename(root / "gone"), "IXI_test.csv lists 2"),
    ],
)
def test_bad_layout_fails_before_any_volume_and_writes_nothing(tmp_path, damage, message):
    root = write_layout(tmp_path / "data")
    damage(root)
    out = tmp_path / "runs" / "eval"
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=message):
        _evaluate(IdentityModel(fail_after=0), root, out)
    assert time.perf_counter() - t0 < 5
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_failure_half_way_leaves_no_output_folder(tmp_path):
    root = write_layout(tmp_path / "data")
    out = tmp_path / "eval"
    model = IdentityModel(fail_after=3)
    with pytest.raises(RuntimeError, match="half-way"):
        _evaluate(model, root, out)
    assert len(model.brain_masks) == 3  # it did start
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "data"]


# ------------------------------------------------------------------ volumes left out, l1


def test_summary_counts_the_volumes_left_out_of_each_mean(tmp_path):
    root = write_layout(tmp_path / "data", empty_seg_test=True)
    out = tmp_path / "eval"
    model = IdentityModel()
    s = _evaluate(model, root, out, figures=False)
    # every patch is reconstructed under the protocol: no brain mask reaches the model
    assert len(model.brain_masks) == 2 * 4 + 2 and all(m is None for m in model.brain_masks)
    saved = json.loads((out / "summary.json").read_text())
    for ds in ("Brats21", "MSLUB"):
        d = saved["datasets"][ds]
        # identity: residual 0, threshold 0, nothing predicted; the test volume without
        # lesion voxels has Dice 0/0 = NaN and is left out, the other one counts (0)
        assert d["metrics"]["dice"] == {"mean": 0.0, "n": 1}  # one volume: no sd
        assert d["excluded"]["dice"]["n"] == 1 and "0/0" in d["excluded"]["dice"]["reason"]
        assert d["excluded"]["auprc"]["n"] == 1 and d["metrics"]["auprc"]["n"] == 1
        rows = list(csv.DictReader((out / f"{ds}_test_subjects.csv").open()))
        assert [r["dice"] for r in rows] == ["0", ""]
    assert saved["datasets"]["IXI"]["excluded"] == {}
    assert saved == json.loads(json.dumps(s.to_json(), default=str).replace("NaN", "null"))
    page = (out / "report.html").read_text()
    assert "left out of the means: dice 1 (no lesion voxels and an empty prediction" in page
    # a second run into the same folder: refused, or with overwrite the results replaced in place
    with pytest.raises(DataError, match="--overwrite"):
        _evaluate(IdentityModel(fail_after=0), root, out, figures=False, label="again")
    _evaluate(IdentityModel(), root, out, figures=False, label="again", overwrite=True)
    assert json.loads((out / "summary.json").read_text())["model"] == "again"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_ixi_l1_reconstructs_every_patch(tmp_path):
    from maediff.config import get_preset
    from maediff.data.datasets import load_subject
    from maediff.data.splits import read_pddpm_split
    from maediff.models.maediff import MAEDiff
    from maediff.pipeline.detect import reconstruct_volume

    root = write_layout(tmp_path / "data", n_val=1, n_test=1, n_ixi=1)
    # a small brain in a corner of the IXI scan: on the model grid (32 x 32, patches of
    # 16 at stride 8) 5 of the 9 patches hold no brain, which the config would skip
    sub = read_pddpm_split(root, "IXI", "test")[0]
    X, Y, Z = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    mask = (X - 5) ** 2 + (Y - 5) ** 2 + (Z - 6) ** 2 <= 9
    img = (0.5 + 0.3 * np.random.default_rng(0).random(SHAPE)) * mask
    nib.save(nib.Nifti1Image(img.astype(np.float32), AFF), str(sub.image))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFF), str(sub.mask))
    cfg = DataConfig(volume_shape=(32, 32, 2), spacing=2.0, center="image", curvature_flow=False)

    torch.manual_seed(0)
    model = MAEDiff(get_preset("tiny")).eval()
    assert model.cfg.geometry.image_size == 32 and model.cfg.inference.skip_empty_patches
    s = _evaluate(model, root, tmp_path / "eval", datasets=(), data_cfg=cfg, figures=False)

    vol = load_subject(sub, cfg)
    l1 = {}
    for skip in (False, True):
        rec = reconstruct_volume(
            model, vol, torch.Generator().manual_seed(0), skip_empty_patches=skip
        )
        l1[skip] = float(np.abs(vol.image.astype(np.float64) - rec).mean())
    assert s.mean("IXI", "l1") == pytest.approx(l1[False], rel=1e-6)
    assert abs(l1[False] - l1[True]) > 0.05 * l1[False]  # the check can tell the two apart


# ------------------------------------------------------------------ the label


def test_an_evaluation_is_labelled_by_the_registry_unless_told(tmp_path):
    """EvalOptions.label defaulted to "MAEDiff": a DAE evaluated through the Python API
    was labelled MAEDiff in its summary and tables."""
    from maediff.models import build_model

    root = write_layout(tmp_path / "data", n_val=1, n_test=1, n_ixi=1)
    dae = build_model(replace(get_preset("dae-tiny"), data=DATA_CFG))
    s = _evaluate(dae, root, tmp_path / "dae", figures=False, max_volumes=1, workers=0)
    assert s.model == "DAE"
    s = _evaluate(IdentityModel(), root, tmp_path / "id", figures=False, label="Identity")
    assert s.model == "Identity"
