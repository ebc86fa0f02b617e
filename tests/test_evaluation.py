import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from maediff.evaluation import (
    PooledVoxels,
    VolumeResult,
    average_precision,
    best_dice,
    dice,
    erode_mask_slicewise,
    evaluate_split,
    fpr_threshold,
    greedy_threshold_search,
    median_filter_3d,
    remove_small_components,
    roc_auc,
)
from maediff.evaluation.aggregate import combine_runs, summarise, write_json, write_subject_csv


def test_dice_by_hand():
    p = np.array([1, 1, 0, 0], bool)
    g = np.array([1, 0, 1, 0], bool)
    assert dice(p, g) == pytest.approx(0.5)
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert dice(p, np.zeros(4, bool)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        dice(p, g[:3])


def test_ap_and_auroc_by_hand():
    s = np.array([0.9, 0.8, 0.7, 0.6])
    y = np.array([1, 0, 1, 0])
    # AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision(s, y) == pytest.approx(0.5 + 1 / 3)
    # pairs (pos, neg) ranked right: (0.9>0.8), (0.9>0.6), (0.7>0.6) of 4 -> 0.75
    assert roc_auc(s, y) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_sklearn_on_random_volumes(seed):
    rng = np.random.default_rng(seed)
    y = rng.random((20, 20, 10)) < 0.1
    s = rng.random((20, 20, 10)) + y * rng.random((20, 20, 10)) * 0.5
    s = np.round(s, 2)  # plenty of ties
    assert average_precision(s, y) == pytest.approx(
        average_precision_score(y.ravel(), s.ravel()), abs=1e-6
    )
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-6)


def test_metric_edge_cases():
    s = np.random.default_rng(0).random((4, 4, 4))
    none = np.zeros((4, 4, 4), bool)
    assert np.isnan(average_precision(s, none)) and np.isnan(roc_auc(s, none))
    assert np.isnan(roc_auc(s, np.ones((4, 4, 4), bool)))
    lab = none.copy()
    lab[0, 0, 0] = True
    zero = np.zeros((4, 4, 4))
    # all-zero map: one tie group; AP = prevalence, AUROC = 0.5
    assert average_precision(zero, lab) == pytest.approx(1 / 64)
    assert roc_auc(zero, lab) == pytest.approx(0.5)


def test_oracle_best_dice():
    s = np.array([0.9, 0.8, 0.7, 0.1]).reshape(2, 2, 1)
    y = np.array([1, 1, 0, 0], bool).reshape(2, 2, 1)
    d, t = best_dice(s, y)
    assert d == 1.0 and t == pytest.approx(0.8)


def test_slicewise_erosion_with_cross():
    m = np.zeros((11, 11, 3), bool)
    m[2:9, 2:9, :] = True  # 7x7 square in each slice
    e = erode_mask_slicewise(m, 3)
    # 3 erosions with a cross leave the centre pixel of a 7x7 square; no z erosion
    assert e.sum() == 3 and e[5, 5].all()
    e1 = erode_mask_slicewise(m, 1)
    assert e1[:, :, 0].sum() == 25 and (e1[:, :, 0] == e1[:, :, 2]).all()


def test_median_filter_crop_equals_full_volume():
    rng = np.random.default_rng(0)
    v = np.zeros((30, 28, 20), np.float32)
    v[5:20, 3:25, 0:12] = rng.random((15, 22, 12))  # touches the border in z
    np.testing.assert_array_equal(
        median_filter_3d(v, 5), ndimage.median_filter(v, size=5, mode="reflect")
    )
    assert not median_filter_3d(np.zeros((5, 5, 5)), 5).any()


def test_remove_small_components_26_connectivity():
    b = np.zeros((10, 10, 10), bool)
    b[0:2, 0:2, 0:2] = True  # 8 voxels: kept
    b[5:7, 5:7, 5] = True  # 4 voxels: removed
    b[5, 5, 5] = True
    for i in range(7):  # 7 voxels joined only diagonally (26-connected): removed
        b[i, 9 - i, 9] = False
    diag = np.zeros_like(b)
    for i in range(8):  # 8 diagonal voxels: one 26-component of size 8, kept
        diag[i + 2, i, 8 - (i % 2)] = True
    out = remove_small_components(b | diag, 7)
    assert out[0:2, 0:2, 0:2].all()
    assert not out[5:7, 5:7, 5].any()
    assert out[diag].all()


def test_greedy_search_finds_separating_threshold():
    pool = PooledVoxels()
    rng = np.random.default_rng(0)
    for _ in range(3):
        lab = rng.random((10, 10, 10)) < 0.2
        sc = np.where(lab, 0.6 + 0.4 * rng.random(lab.shape), 0.5 * rng.random(lab.shape))
        sc[0, 0, 0] = 0.0  # a zero-score voxel is excluded from the pool
        pool.add(sc.astype(np.float32), lab)
    t, d = greedy_threshold_search(pool, steps=10)
    assert 0.5 <= t < 0.6 and d == 1.0 or (0.45 < t < 0.65 and d > 0.98)
    empty = PooledVoxels()
    empty.add(np.zeros((2, 2, 2)), np.ones((2, 2, 2), bool))
    assert greedy_threshold_search(empty) == (0.0, 0.0)
    assert empty.missed_positives == 8


def test_greedy_search_visits_quarter_points_by_hand():
    # scores 0..1; lesion = scores > 0.3: step 1 compares 0.25 (dice<1) and 0.75 -> keeps lower half
    sc = np.linspace(0.001, 1.0, 1000).reshape(10, 10, 10).astype(np.float32)
    pool = PooledVoxels()
    pool.add(sc, sc > 0.3)
    t, d = greedy_threshold_search(pool, steps=10)
    assert abs(t - 0.3) < 2e-3 and d > 0.995


def test_fpr_threshold():
    h = np.arange(1000, dtype=np.float64)
    assert fpr_threshold(h, 0.05) == pytest.approx(np.quantile(h, 0.95))
    with pytest.raises(ValueError, match="fpr"):
        fpr_threshold(h, 1.5)


def _volume(name, rng, lesion=True):
    img = rng.random((24, 24, 12)).astype(np.float32) * 0.2
    mask = np.zeros_like(img, bool)
    mask[2:22, 2:22, :] = True
    seg = np.zeros_like(mask)
    if lesion:
        seg[6:17, 6:17, 2:10] = True
        img[seg] += 0.7
    rec = img + 0.05 * rng.random(img.shape).astype(np.float32)  # imperfect reconstruction
    rec[seg] -= 0.7  # the "healthy" reconstruction removes the lesion
    return VolumeResult(name, img * mask, rec * mask, mask, seg if lesion else None)


def test_evaluate_split_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    val = [_volume(f"v{i}", rng) for i in range(3)]
    test = [_volume(f"t{i}", rng) for i in range(4)]
    healthy = [_volume(f"h{i}", rng, lesion=False) for i in range(2)]
    out = evaluate_split(val, test, healthy_val_volumes=healthy)
    assert 0 < out.threshold < 0.7 and out.val_dice > 0.8
    assert len(out.records) == 4 and set(out.fpr_thresholds) == {"fpr1", "fpr5", "fpr10"}
    s = summarise(out.records)
    assert s["dice"]["mean"] > 0.8 and s["auprc"]["mean"] > 0.9 and s["dice"]["n"] == 4
    # the same numbers with two worker processes
    out2 = evaluate_split(val, test, healthy_val_volumes=healthy, n_jobs=2)
    assert out2.threshold == out.threshold
    assert [r["dice"] for r in out2.records] == [r["dice"] for r in out.records]
    write_subject_csv(
        out.records, tmp_path / "s.csv", {"split": "test", "threshold": out.threshold}
    )
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("split,threshold,subject") and len(lines) == 5
    write_json({"summary": s, "nan": float("nan")}, tmp_path / "s.json")
    assert '"nan": null' in (tmp_path / "s.json").read_text()
    with pytest.raises(ValueError, match="no segmentation"):
        evaluate_split(healthy, test)
    with pytest.raises(ValueError, match="differ in shape"):
        VolumeResult("bad", np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), np.zeros((2, 2, 2)))


def test_combine_runs():
    a = {"dice": {"mean": 0.4, "std": 0.1, "n": 10}}
    b = {"dice": {"mean": 0.6, "std": 0.1, "n": 10}}
    c = combine_runs([a, b])
    assert c["dice"]["mean"] == pytest.approx(0.5) and c["dice"]["std"] == pytest.approx(0.1)


def test_report_table_and_figures(tmp_path):
    from maediff.evaluation.report import (
        figure_dice_distribution,
        figure_examples,
        figure_pr_curves,
        pick_slices,
        results_table,
        write_html,
    )

    rows = [
        {
            "model": "MAEDiff",
            "BraTS21": {
                "dice": {"mean": 0.4207, "std": 0.0112},
                "auprc": {"mean": 0.4548, "std": 0.0147},
            },
            "IXI": {"l1": {"mean": 0.01148, "std": 0.00056}},
        },
        {"model": "Thresh", "BraTS21": {"dice": {"mean": 0.1969, "std": 0.0}}},
    ]
    md, csv_text = results_table(rows, ["BraTS21"], ["IXI"])
    assert "| MAEDiff | 42.07 ± 1.12 | 45.48 ± 1.47 | 11.48 ± 0.56 |" in md
    assert "| Thresh | 19.69 | - | - |" in md
    assert csv_text.splitlines()[0] == "Model,BraTS21 Dice (%),BraTS21 AUPRC (%),IXI l1 (1e-3)"

    rng = np.random.default_rng(0)
    seg = np.zeros((24, 24, 12), bool)
    seg[5:10, 5:10, 7] = True
    seg[5:8, 5:8, 2] = True
    assert pick_slices(seg, np.zeros(seg.shape), 2) == [2, 7]
    img = rng.random(seg.shape)
    ex = {
        "name": "s1",
        "image": img,
        "reconstruction": img * 0.9,
        "scores": img * seg,
        "segmentation": seg,
        "prediction": seg,
    }
    f1 = figure_examples([ex], tmp_path / "ex.png")
    f2 = figure_pr_curves({"a": (img.ravel(), seg.ravel())}, tmp_path / "pr.png")
    f3 = figure_dice_distribution(
        {"a": [0.1, 0.5, float("nan")], "b": [0.3]}, tmp_path / "dice.png"
    )
    for f in (f1, f2, f3):
        assert f.stat().st_size > 5000 and f.read_bytes()[:4] == b"\x89PNG"
    page = write_html(
        tmp_path / "report.html",
        "Report",
        [{"heading": "Results", "table": md, "images": [f1, f2, f3]}],
    )
    text = page.read_text()
    assert "<td>42.07 ± 1.12</td>" in text and "src='ex.png'" in text
