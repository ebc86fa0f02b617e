import csv
import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from maediff.config import DataConfig
from maediff.data.datasets import SliceSet, load_subject, slices_to_volume, volume_to_slices
from maediff.data.io import DataError, load_nifti, save_like
from maediff.data.load import curvature_flow, prepare_volume, rescale_percentiles
from maediff.data.splits import (
    Subject,
    read_folder,
    read_inputs,
    read_pddpm_split,
    read_subject_csv,
    t1_to_t2,
)
from maediff.data.synthetic import SynthConfig, generate_benchmark, make_subject, template

AFF = np.array([[2.0, 0, 0, -96], [0, 2, 0, -114], [0, 0, 2, -40], [0, 0, 0, 1]])


def _brain(shape=(40, 44, 20)):
    X, Y, Z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (X / 0.8) ** 2 + (Y / 0.85) ** 2 + (Z / 1.2) ** 2 < 1
    img = (100 + 50 * np.sin(4 * X) * np.cos(3 * Y)) * mask
    seg = ((X - 0.2) ** 2 + Y**2 + Z**2 < 0.05) & mask
    return img.astype(np.float32), mask.astype(np.uint8), seg.astype(np.uint8)


def _write(tmp_path, name, data, affine=AFF):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), str(p))
    return p


# ------------------------------------------------------------------ NIfTI IO


def test_save_like_round_trip_keeps_affine_header_values(tmp_path):
    img, mask, _ = _brain()
    ref_path = _write(tmp_path, "scan.nii.gz", img.astype(np.int16))
    ref = load_nifti(ref_path)
    ref.header["descrip"] = b"scanner X"
    data = np.random.default_rng(0).random(img.shape).astype(np.float32)
    out = save_like(data, ref, tmp_path / "out" / "map.nii.gz")
    back = nib.load(str(out))
    assert back.shape == img.shape
    np.testing.assert_array_equal(back.affine, ref.affine)
    assert back.header.get_data_dtype() == np.float32
    assert back.header["descrip"] == b"scanner X"
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)  # exact: no scaling
    m = save_like(mask, ref, tmp_path / "mask.nii.gz", dtype=np.uint8)
    assert nib.load(str(m)).get_data_dtype() == np.uint8
    assert not list(tmp_path.glob("**/.*tmp*"))
    with pytest.raises(DataError, match="differs from the reference grid"):
        save_like(data[:-1], ref, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


# ------------------------------------------------------------------ bad input, one test per case


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.nii\.gz does not exist"):
        load_nifti(tmp_path / "nope.nii.gz")


def test_not_a_nifti_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(DataError, match="notes.txt is not a NIfTI file"):
        load_nifti(p)
    q = tmp_path / "fake.nii"
    q.write_bytes(b"0" * 400)
    with pytest.raises(DataError, match="fake.nii"):
        load_nifti(q)


def test_truncated_archive(tmp_path):
    p = _write(tmp_path, "scan.nii.gz", _brain()[0])
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="scan.nii.gz is unreadable or truncated"):
        load_nifti(p)


def test_two_dimensional_image(tmp_path):
    p = _write(tmp_path, "slice.nii.gz", np.zeros((10, 10), np.float32))
    with pytest.raises(DataError, match=r"slice.nii.gz has 2 dimensions"):
        load_nifti(p)


def test_four_dimensional_image(tmp_path):
    p = _write(tmp_path, "series.nii.gz", np.zeros((10, 10, 5, 3), np.float32))
    with pytest.raises(DataError, match=r"series.nii.gz has 4 dimensions"):
        load_nifti(p)
    ok = _write(tmp_path, "single.nii.gz", np.ones((10, 10, 5, 1), np.float32))
    assert load_nifti(ok).shape == (10, 10, 5)


def test_nan_or_inf_voxels(tmp_path):
    img = _brain()[0]
    img[3, 3, 3] = np.nan
    img[4, 4, 4] = np.inf
    p = _write(tmp_path, "nan.nii.gz", img)
    with pytest.raises(DataError, match="nan.nii.gz contains 2 NaN or Inf voxels"):
        load_nifti(p)


def test_empty_brain_mask(tmp_path):
    img, mask, _ = _brain()
    s = Subject(
        "a",
        _write(tmp_path, "a.nii.gz", img),
        _write(tmp_path, "a_mask.nii.gz", np.zeros_like(mask)),
    )
    with pytest.raises(DataError, match="a.nii.gz: a: the brain mask is empty"):
        load_subject(s, DataConfig(volume_shape=(24, 24, 12)))


def test_mask_shape_mismatch(tmp_path):
    img, mask, _ = _brain()
    s = Subject(
        "a", _write(tmp_path, "a.nii.gz", img), _write(tmp_path, "a_mask.nii.gz", mask[:-2])
    )
    with pytest.raises(
        DataError,
        match=r"brain mask .*a_mask.nii.gz has shape \(38, 44, 20\) but image .*a.nii.gz has shape \(40, 44, 20\)",
    ):
        load_subject(s, DataConfig())


def test_segmentation_shape_mismatch(tmp_path):
    img, mask, seg = _brain()
    s = Subject(
        "a",
        _write(tmp_path, "a.nii.gz", img),
        _write(tmp_path, "a_mask.nii.gz", mask),
        _write(tmp_path, "a_seg.nii.gz", seg[:, :-1]),
    )
    with pytest.raises(DataError, match=r"segmentation .*a_seg.nii.gz has shape"):
        load_subject(s, DataConfig())


def test_csv_lists_missing_files(tmp_path):
    img = _write(tmp_path, "a.nii.gz", _brain()[0])
    p = tmp_path / "list.csv"
    p.write_text(f"image,mask\n{img.name},a_mask.nii.gz\nb.nii.gz,\n")
    with pytest.raises(
        DataError,
        match=r"list.csv lists 2 file\(s\) that do not exist: .*a_mask.nii.gz, .*b.nii.gz",
    ):
        read_subject_csv(p)


# ------------------------------------------------------------------ splits


def test_real_split_counts(splits_dir):
    def n(ds, split, fold=0):
        return len(
            read_pddpm_split("/data", ds, split, fold, splits_dir=splits_dir, check_files=False)
        )

    assert n("IXI", "train") == 385 and n("IXI", "val") == 44
    assert n("IXI", "test") == 158
    assert n("BraTS21", "val") == 100 and n("BraTS21", "test") == 1151
    assert n("MSLUB", "val") == 10 and n("MSLUB", "test") == 20
    assert {n("IXI", "val", k) for k in range(5)} <= {43, 44}
    ixi = read_pddpm_split("/data", "IXI", "train", 0, splits_dir=splits_dir, check_files=False)
    assert len({s.name for s in ixi}) < len(ixi)  # duplicate rows are kept, for parity
    ms = read_pddpm_split("/data", "mslub", "test", splits_dir=splits_dir, check_files=False)
    s = next(x for x in ms if x.name.startswith("patient13"))
    assert str(s.image) == "/data/Test/MSLUB/t2/patient13_t2.nii.gz"
    assert str(s.seg) == "/data/Test/MSLUB/seg/patient13_seg.nii.gz" and s.label == 1
    with pytest.raises(ValueError, match="no training split"):
        read_pddpm_split("/data", "MSLUB", "train", splits_dir=splits_dir)
    with pytest.raises(DataError, match="lists .* file"):
        read_pddpm_split("/nonexistent-data", "MSLUB", "val", splits_dir=splits_dir)


def test_t1_to_t2_rewrites_folder_and_suffix_only():
    assert t1_to_t2("/Test/MSLUB/t1/patient13_t1.nii.gz") == "/Test/MSLUB/t2/patient13_t2.nii.gz"
    assert (
        t1_to_t2("/Train/ixi/t1/IXI105-HH-1471_t1.nii.gz")
        == "/Train/ixi/t2/IXI105-HH-1471_t2.nii.gz"
    )


def test_folder_and_single_file_inputs(tmp_path):
    img, mask, seg = _brain()
    _write(tmp_path, "s1.nii.gz", img)
    _write(tmp_path, "s1_mask.nii.gz", mask)
    _write(tmp_path, "s1_seg.nii.gz", seg)
    _write(tmp_path, "s2.nii", img)
    subs = read_folder(tmp_path)
    assert [s.name for s in subs] == ["s1", "s2"]
    assert (
        subs[0].mask.name == "s1_mask.nii.gz"
        and subs[0].seg.name == "s1_seg.nii.gz"
        and subs[1].mask is None
    )
    single = read_inputs(tmp_path / "s1.nii.gz")
    assert single[0].mask is not None and single[0].label == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI scans"):
        read_folder(tmp_path / "empty")


# ------------------------------------------------------------------ load-time processing


def test_rescale_percentiles():
    data = np.arange(101, dtype=np.float32).reshape(101, 1, 1)
    mask = np.ones_like(data, bool)
    out = rescale_percentiles(data, mask, 1, 99)
    assert out[1, 0, 0] == pytest.approx(0.0) and out[99, 0, 0] == pytest.approx(1.0)
    assert out[50, 0, 0] == pytest.approx(49 / 98) and out.min() == 0 and out.max() == 1
    with pytest.raises(DataError, match="constant"):
        rescale_percentiles(np.ones_like(data), mask)


@pytest.mark.slow
def test_model_grid_input_is_an_identity():
    s = make_subject(0, "tumour", 1)
    aff = template()["affine"]
    v = prepare_volume(
        nib.Nifti1Image(s["image"], aff),
        nib.Nifti1Image(s["mask"], aff),
        nib.Nifti1Image(s["seg"], aff),
        DataConfig(),
        "t",
    )
    np.testing.assert_allclose(v.affine, aff)
    assert np.array_equal(v.brain_mask, s["mask"] > 0) and np.array_equal(
        v.segmentation, s["seg"] > 0
    )
    assert v.image.min() >= 0 and v.image.max() <= 1 and v.image[~v.brain_mask].max() == 0
    np.testing.assert_allclose(v.to_input_space(v.image), v.image, atol=1e-6)


@pytest.mark.slow
def test_one_mm_flipped_input_maps_to_the_same_grid_and_back():
    from scipy import ndimage

    s = make_subject(0, "tumour", 1)
    aff = template()["affine"]
    up = {k: ndimage.zoom(s[k], 2, order=0) for k in ("image", "mask", "seg")}
    aff1 = aff.copy()
    aff1[:3, :3] /= 2
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = up["image"].shape[0] - 1
    aff1 = aff1 @ flip  # x axis stored left to right
    nii = {k: nib.Nifti1Image(np.ascontiguousarray(up[k][::-1]), aff1) for k in up}
    v = prepare_volume(nii["image"], nii["mask"], nii["seg"], DataConfig(), "t")
    assert v.image.shape == (96, 96, 50)
    assert np.allclose(np.diag(v.affine)[:3], 2.0)  # RAS model grid
    back = v.to_input_space(v.segmentation.astype(np.float32), labels=True)
    assert back.shape == up["seg"].shape
    assert (back == up["seg"][::-1]).mean() > 0.99


def _prepare(img, mask, seg=None, affine=AFF, **cfg):
    cfg = DataConfig(**{"volume_shape": (24, 24, 12), **cfg})
    nii = [nib.Nifti1Image(a, affine) if a is not None else None for a in (img, mask, seg)]
    return prepare_volume(*nii, cfg)


def test_curvature_flow_switch_changes_the_image_only():
    img, mask, seg = _brain()
    img = img + np.random.default_rng(0).normal(0, 5, img.shape).astype(np.float32) * mask
    a = _prepare(img, mask, seg, curvature_flow=False)
    b = _prepare(img, mask, seg, curvature_flow=True)
    assert a.image.shape == b.image.shape == (24, 24, 12)
    assert b.image.dtype == np.float32 and 0 <= b.image.min() and b.image.max() <= 1
    assert not np.allclose(a.image, b.image)
    # masks and labels are never smoothed; without a mask, the brain is taken from the
    # unsmoothed image (image > 0), so the switch cannot move it either
    np.testing.assert_array_equal(a.brain_mask, b.brain_mask)
    np.testing.assert_array_equal(a.segmentation, b.segmentation)
    na = _prepare(img, None, curvature_flow=False)
    nb = _prepare(img, None, curvature_flow=True)
    np.testing.assert_array_equal(na.brain_mask, nb.brain_mask)
    assert _prepare(img, mask).segmentation is None


def test_curvature_flow_equals_the_reference_reader_on_1mm_data(tmp_path):
    # pDDPM's reader: sitk.ReadImage(path, sitkFloat32) then CurvatureFlow(0.125, 3), on
    # its 1 mm isotropic files; an integer file with a flipped, permuted 1 mm affine
    import SimpleITK as sitk

    img, _, _ = _brain()
    noisy = img + np.random.default_rng(1).normal(0, 8, img.shape)
    aff = np.array([[-1.0, 0, 0, 90], [0, 0, 1, -120], [0, 1, 0, -60], [0, 0, 0, 1]])
    p = _write(tmp_path, "scan.nii.gz", noisy.astype(np.int16), aff)
    ref = sitk.CurvatureFlow(
        image1=sitk.ReadImage(str(p), sitk.sitkFloat32), timeStep=0.125, numberOfIterations=3
    )
    expected = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)
    data = np.asarray(load_nifti(p).dataobj, dtype=np.float32)
    out = curvature_flow(data)
    assert out.dtype == np.float32 and out.shape == data.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-3)
    assert np.abs(out - data).max() > 1  # it did smooth


@pytest.mark.parametrize("spacing", [0.4, 1.0, 3.0])
def test_curvature_flow_is_stable_at_any_spacing(spacing):
    # with the physical spacing, a 0.125 time step diverges below 1 mm; on the voxel
    # grid the flow only smooths: the result stays within the input's range
    img, mask, _ = _brain()
    noisy = img + np.random.default_rng(2).normal(0, 10, img.shape).astype(np.float32)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    data = np.asarray(nib.Nifti1Image(noisy, aff).dataobj, dtype=np.float32)
    out = curvature_flow(data)
    assert noisy.min() - 1e-3 <= out.min() and out.max() <= noisy.max() + 1e-3
    assert np.abs(out - img).mean() < np.abs(noisy - img).mean()  # closer to the clean image
    v = _prepare(noisy, mask, affine=aff, spacing=2.0 * spacing)
    assert np.isfinite(v.image).all() and v.image.max() <= 1 and v.brain_mask.any()


# ------------------------------------------------------------------ slices


def test_slice_set_epochs_and_resizing():
    rng = np.random.default_rng(0)

    class V:
        def __init__(self, i):
            self.name = f"v{i}"
            self.image = rng.random((16, 16, 6)).astype(np.float32)
            self.brain_mask = np.zeros((16, 16, 6), bool)
            self.brain_mask[4:12, 4:12, 1:5] = True

    vols = [V(i) for i in range(5)]
    ss = SliceSet(vols, image_size=8)
    g = torch.Generator().manual_seed(0)
    pairs = ss.epoch_indices(g)
    assert sorted(v for v, _ in pairs) == [0, 1, 2, 3, 4]
    assert all(1 <= z <= 4 for _, z in pairs)  # only slices with brain
    assert len(ss.epoch_indices(g, all_slices=True)) == 20
    batches = list(ss.batches(pairs, 2))
    assert [b.shape for b in batches] == [(2, 1, 8, 8), (2, 1, 8, 8), (1, 1, 8, 8)]
    v, z = pairs[0]
    expected = vols[v].image[:, :, z].reshape(8, 2, 8, 2).mean(axis=(1, 3))  # area resize
    np.testing.assert_allclose(batches[0][0, 0].numpy(), expected, atol=1e-6)
    sl = volume_to_slices(vols[0].image, 16)
    np.testing.assert_array_equal(slices_to_volume(sl, (16, 16, 6)), vols[0].image)


# ------------------------------------------------------------------ synthetic benchmark


@pytest.mark.slow
def test_synthetic_subjects_are_deterministic_and_plausible():
    a = make_subject(3, "tumour", 0)
    b = make_subject(3, "tumour", 0)
    c = make_subject(4, "tumour", 0)
    assert np.array_equal(a["image"], b["image"]) and not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (96, 96, 50) and a["seg"].sum() > 500
    assert (a["image"][a["mask"] == 0] == 0).all()
    assert (a["seg"] <= a["mask"]).all()
    h = make_subject(3, "healthy", 0)
    assert h["seg"].sum() == 0
    ms = make_subject(3, "ms", 0)
    assert 5 < ms["seg"].sum() < 2000
    # T2 contrast: lesions are brighter than the surrounding brain on average
    img = a["image"] / np.percentile(a["image"][a["mask"] > 0], 99)
    assert img[a["seg"] > 0].mean() > img[(a["mask"] > 0) & (a["seg"] == 0)].mean()


@pytest.mark.slow
def test_generate_benchmark_in_pddpm_layout(tiny_bench):
    # tiny_bench (conftest): 6 healthy train+val, 2 healthy test, tumour 1 / 2, MS 1 / 1
    root = tiny_bench
    train = read_pddpm_split(root, "IXI", "train", 0)
    val = read_pddpm_split(root, "IXI", "val", 0)
    assert len(train) + len(val) == 6 and len(val) == 2  # 6 split into 5 folds: 2, 1, 1, 1, 1
    assert len(read_pddpm_split(root, "IXI", "test")) == 2
    bt = read_pddpm_split(root, "Brats21", "test")
    assert len(bt) == 2 and all(s.seg is not None and s.label == 1 for s in bt)
    vol = load_subject(bt[0], DataConfig())
    assert vol.image.shape == (96, 96, 50) and vol.segmentation.any()
    with open(root / "splits" / "IXI_test.csv") as f:
        assert "/t1/" in next(csv.DictReader(f))["img_path"]
    with pytest.raises(DataError, match="not empty"):
        generate_benchmark(root, SynthConfig(workers=1), progress=False)
    assert not [
        p for p in root.parent.iterdir() if p.name.startswith(".")
    ]  # no temporary folder left
    assert gzip.open(root / "Train/ixi/t2" / f"{train[0].name}.nii.gz").read(4)
