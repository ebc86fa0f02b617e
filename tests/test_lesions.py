"""Results by lesion (evaluation/lesions.py) against values worked out by hand, and the
synthetic benchmark's record of what it drew per lesion."""

import csv
import math

import numpy as np
import pytest

from maediff.evaluation.lesions import lesion_rows, lesion_summary, merge_runs


def _arrays():
    gt = np.zeros((10, 10, 4), bool)
    gt[1, 1, 1] = gt[2, 2, 2] = True  # lesion 1: two voxels touching at a corner (26-conn.)
    gt[7, 7, 1:4] = True  # lesion 2: three voxels
    pred = np.zeros_like(gt)
    pred[1, 1, 1] = True  # covers half of lesion 1
    pred[1, 8, 0:2] = True  # a false-positive component
    pred[5, 5, 0] = pred[5, 5, 2] = True  # two more, not touching each other (k gap)
    return pred, gt


def test_lesion_rows_by_hand():
    pred, gt = _arrays()
    rows, counts = lesion_rows(pred, gt, voxel_ml=0.008)
    assert [r["voxels"] for r in rows] == [2, 3]
    assert [r["covered"] for r in rows] == [0.5, 0.0]
    assert [r["detected"] for r in rows] == [True, False]
    assert rows[1]["volume_ml"] == pytest.approx(0.024)
    assert (rows[1]["i"], rows[1]["j"], rows[1]["k"]) == (7.0, 7.0, 2.0)
    # TP 1, FN 1, FP 3: F1 = 2 / (2 + 1 + 3)
    assert counts == {
        "lesions": 2,
        "lesions_detected": 1,
        "fp_components": 3,
        "lesion_ml": pytest.approx(0.04),
        "lesion_f1": pytest.approx(2 / 6),
    }
    # a stricter rule: more than half of the voxels must be covered
    rows, counts = lesion_rows(pred, gt, voxel_ml=0.008, overlap=0.5)
    assert counts["lesions_detected"] == 0 and counts["lesion_f1"] == 0.0
    # nothing to find and nothing found: F1 undefined
    empty = np.zeros_like(gt)
    assert math.isnan(lesion_rows(empty, empty, 1.0)[1]["lesion_f1"])


def test_centroids_in_mm_and_the_drawn_lesions_join():
    pred, gt = _arrays()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = (-10, -10, 0)
    drawn = [
        {"x_mm": 4.0, "y_mm": 4.0, "z_mm": 6.0, "kind": "ms", "lesion": 9},  # voxel (7, 7, 2)
        {"x_mm": -100.0, "y_mm": 0.0, "z_mm": 0.0, "kind": "ms", "lesion": 10},  # outside
    ]
    rows, _ = lesion_rows(pred, gt, 0.012, affine=affine, drawn=drawn)
    assert (rows[1]["x_mm"], rows[1]["y_mm"], rows[1]["z_mm"]) == (4.0, 4.0, 6.0)
    assert rows[1]["drawn_kind"] == "ms" and rows[1]["drawn_lesion"] == 9
    assert "drawn_kind" not in rows[0]


def test_lesion_summary_bands_by_hand():
    rows = [
        {"volume_ml": 0.05, "detected": False},
        {"volume_ml": 0.5, "detected": True},
        {"volume_ml": 0.7, "detected": False},
        {"volume_ml": 30.0, "detected": True},
    ]
    records = [
        {
            "lesions": 3,
            "lesions_detected": 1,
            "fp_components": 2,
            "lesion_ml": 1.25,
            "dice": 0.2,
            "auprc": 0.1,
        },
        {
            "lesions": 1,
            "lesions_detected": 1,
            "fp_components": 0,
            "lesion_ml": 30.0,
            "dice": 0.8,
            "auprc": 0.9,
        },
    ]
    s = lesion_summary(records, rows)
    assert (s["lesions"], s["detected"], s["fp_components"]) == (4, 2, 2)
    assert s["fp_per_volume"] == 1.0 and s["sensitivity"] == 0.5
    assert s["lesion_f1"] == pytest.approx(4 / (4 + 2 + 2))
    by = {b["band"]: (b["n"], b["detected"]) for b in s["by_lesion_volume"]}
    assert by == {
        "0-0.1 ml": (1, 0),
        "0.1-1 ml": (2, 1),
        "1-10 ml": (0, 0),
        "10-50 ml": (1, 1),
        "≥ 50 ml": (0, 0),
    }
    load = {b["band"]: (b["n"], b["dice"]) for b in s["by_volume_load"] if b["n"]}
    assert load == {"1-10 ml": (1, 0.2), "10-50 ml": (1, 0.8)}
    merged = merge_runs([s, s])
    assert merged["lesions"] == 8 and merged["lesion_f1"] == s["lesion_f1"]
    assert merged["by_lesion_volume"][1] == {
        "band": "0.1-1 ml",
        "n": 4,
        "detected": 2,
        "sensitivity": 0.5,
    }


def test_synthetic_benchmark_records_every_lesion(tiny_bench):
    import nibabel as nib

    rows = list(csv.DictReader((tiny_bench / "lesions.csv").open()))
    assert {r["kind"] for r in rows} == {"tumour", "ms"}
    tumours = [r for r in rows if r["kind"] == "tumour"]
    assert len(tumours) == 3  # tumour_val 1 + tumour_test 2: one tumour each
    for r in rows[:6]:
        folder = "Brats21" if r["kind"] == "tumour" else "MSLUB"
        stem = r["subject"][: -len("_t2")]
        img = nib.load(tiny_bench / "Test" / folder / "seg" / f"{stem}_seg.nii.gz")
        seg = np.asarray(img.dataobj) > 0
        ijk = np.rint(
            np.linalg.inv(img.affine) @ [float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"]), 1]
        )
        assert seg[tuple(ijk[:3].astype(int))], r  # the drawn centre is a lesion voxel
        if r["kind"] == "tumour":
            assert int(r["voxels"]) == int(seg.sum())
        voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
        assert float(r["volume_ml"]) == pytest.approx(int(r["voxels"]) * voxel_ml, rel=1e-3)
