import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from maediff.data.io import DataError
from maediff.data.load import from_sitk, to_sitk
from maediff.data.preprocess import RawOptions, crop_to_brain, n4_bias_correction, preprocess_scan
from maediff.data.synthetic import make_subject, template


def _subject():
    s = make_subject(0, "healthy", 0)
    return s["image"], s["mask"], template()["affine"]


@pytest.mark.slow
def test_n4_reduces_a_multiplicative_bias():
    img, mask, aff = _subject()
    X = np.linspace(-1, 1, img.shape[0])[:, None, None]
    biased = img * np.exp(0.4 * X)
    out = from_sitk(n4_bias_correction(to_sitk(biased, aff), to_sitk(mask.astype(np.float32), aff)))
    m = mask > 0

    def left_right_ratio(a):
        half = a.shape[0] // 2
        return a[:half][m[:half]].mean() / a[half:][m[half:]].mean()

    assert abs(np.log(left_right_ratio(out))) < 0.5 * abs(np.log(left_right_ratio(biased)))


@pytest.mark.slow
def test_registration_recovers_a_shift(tmp_path):
    img, mask, aff = _subject()
    # the template is the subject itself; the scan is the subject moved by 6 mm
    tpl = tmp_path / "tpl.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), str(tpl))
    moved_aff = aff.copy()
    moved_aff[:3, 3] += [6.0, -4.0, 0.0]
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(img, moved_aff), str(scan))
    nib.save(nib.Nifti1Image(mask, moved_aff), str(tmp_path / "scan_mask.nii.gz"))
    out_img, out_mask = preprocess_scan(
        scan,
        tmp_path / "out",
        tmp_path / "scan_mask.nii.gz",
        RawOptions(n4=False, crop=False, template=str(tpl)),
    )
    res = nib.load(str(out_img))
    assert res.shape == img.shape
    np.testing.assert_allclose(res.affine, aff, atol=1e-4)
    reg = np.asarray(res.dataobj)
    # what the 6 mm / 4 mm misalignment (3 and 2 voxels) would cost without registration
    before = np.corrcoef(img.ravel(), np.roll(img, (3, -2), axis=(0, 1)).ravel())[0, 1]
    after = np.corrcoef(img.ravel(), reg.ravel())[0, 1]
    assert after > 0.99 and after > before + 0.05
    out_m = np.asarray(nib.load(str(out_mask)).dataobj)
    assert out_m.dtype == np.uint8 and (out_m > 0).sum() > 0.9 * (mask > 0).sum()


def test_crop_and_threshold_fallback(tmp_path):
    img, mask, aff = _subject()
    padded = np.zeros((120, 120, 60), np.float32)
    padded[10:106, 10:106, 5:55] = img
    p = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(padded, aff), str(p))
    out_img, out_mask = preprocess_scan(
        p, tmp_path / "o", None, RawOptions(skull_strip="threshold", register=False, n4=False)
    )
    shape = nib.load(str(out_img)).shape
    assert all(s < 120 for s in shape[:2]) and shape == nib.load(str(out_mask)).shape
    with pytest.raises(DataError, match="empty"):
        crop_to_brain(sitk.Image(4, 4, 4, sitk.sitkFloat32), sitk.Image(4, 4, 4, sitk.sitkFloat32))


def test_missing_hd_bet_is_explained(tmp_path):
    if shutil.which("hd-bet"):
        pytest.skip("HD-BET is installed here")
    img, _, aff = _subject()
    p = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), str(p))
    with pytest.raises(DataError, match="HD-BET is not installed"):
        preprocess_scan(p, tmp_path / "o", None, RawOptions(skull_strip="hd-bet"))
    with pytest.raises(DataError, match="no brain mask given"):
        preprocess_scan(p, tmp_path / "o", None, RawOptions())
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
