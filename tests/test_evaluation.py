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
from maediff.evaluation.aggregate import (
    exclusions,
    summarise,
)
from maediff.reporting.files import write_json, write_subject_csv


def test_dice_by_hand():
    p = np.array([1, 1, 0, 0], bool)
    g = np.array([1, 0, 1, 0], bool)
    none = np.zeros(4, bool)
    assert dice(p, g) == pytest.approx(0.5)
    # the reference's 2|P & G| / (|P| + |G|): 0/0 is NaN (left out of the mean), not 1
    assert np.isnan(dice(none, none))
    assert dice(p, none) == 0.0 and dice(none, g) == 0.0
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


def _n_components(b, connectivity):
    return ndimage.label(b, structure=ndimage.generate_binary_structure(3, connectivity))[1]


def test_remove_small_components_26_connectivity():
    shape = (16, 16, 16)
    block = np.zeros(shape, bool)
    block[0:2, 0:2, 0:2] = True  # 8 voxels, face-connected: kept
    small = np.zeros(shape, bool)
    small[5:7, 5:7, 5] = True  # 4 voxels + 1 = 5: removed
    small[5, 5, 6] = True
    diag7 = np.zeros(shape, bool)
    diag8 = np.zeros(shape, bool)
    for i in range(7):  # 7 voxels touching only at corners: one 26-component of 7, removed
        diag7[i + 8, i, 15 - i] = True
    for i in range(8):  # 8 voxels touching only at corners: one 26-component of 8, kept
        diag8[i + 1, i + 8, i + 4] = True
    # the cases are what they claim to be
    assert (block.sum(), small.sum(), diag7.sum(), diag8.sum()) == (8, 5, 7, 8)
    for d, n in ((diag7, 7), (diag8, 8)):
        assert _n_components(d, 3) == 1 and _n_components(d, 2) == n
    b = block | small | diag7 | diag8
    assert _n_components(b, 3) == 4  # the four cases do not touch each other
    out = remove_small_components(b, 7)
    np.testing.assert_array_equal(out, block | diag8)
    # the boundary: max_size 8 removes the 8-voxel components too, 4 keeps all but none
    assert not remove_small_components(b, 8).any()
    np.testing.assert_array_equal(remove_small_components(b, 4), b)


def test_greedy_search_finds_separating_threshold():
    pool = PooledVoxels()
    rng = np.random.default_rng(0)
    scored_lesion, missed = 0, 0
    for _ in range(3):
        lab = rng.random((10, 10, 10)) < 0.2
        sc = np.where(lab, 0.6 + 0.4 * rng.random(lab.shape), 0.5 * rng.random(lab.shape))
        sc[0, 0, 0] = 0.0  # a zero-score voxel is excluded from the pool
        pool.add(sc.astype(np.float32), lab)
        scored_lesion += int((lab & (sc > 0)).sum())
        missed += int(lab[0, 0, 0])
    assert missed > 0 and pool.missed_positives == missed  # seed 0 puts a lesion at [0, 0, 0]
    t, d = greedy_threshold_search(pool, steps=10)
    # any threshold in [0.5, 0.6) separates the scored voxels; the missed lesion voxel
    # stays a false negative: the best pooled Dice is 2 TP / (2 TP + missed), exactly
    assert 0.5 <= t < 0.6
    assert d == 2 * scored_lesion / (2 * scored_lesion + missed)
    empty = PooledVoxels()
    empty.add(np.zeros((2, 2, 2)), np.ones((2, 2, 2), bool))
    assert greedy_threshold_search(empty) == (0.0, 0.0)
    assert empty.missed_positives == 8


def test_greedy_search_ties_keep_the_later_candidate():
    # quantised scores: lesion voxels 1.0, healthy voxels 0.05. Every quarter point
    # above 0.05 predicts exactly the lesion, so the candidates tie at Dice 1.
    sc = np.full((4, 4, 4), 0.05, np.float32)
    lab = np.zeros(sc.shape, bool)
    lab[1:3, 1:3, 1:3] = True
    sc[lab] = 1.0
    pool = PooledVoxels()
    pool.add(sc, lab)
    # step 1 on [0, 1]: 0.25 and 0.75 tie, the lower half is kept, best (0.25, 1);
    # step 2 on [0, 0.5]: 0.125 ties with the best so far and replaces it (`>=`)
    assert greedy_threshold_search(pool, steps=1) == (0.25, 1.0)
    assert greedy_threshold_search(pool, steps=2) == (0.125, 1.0)
    assert greedy_threshold_search(pool, steps=3) == (0.0625, 1.0)
    # step 4 on [0, 0.125]: 0.03125 predicts healthy voxels too, 0.09375 wins (Dice 1)
    assert greedy_threshold_search(pool, steps=4) == (0.09375, 1.0)


def test_greedy_search_best_starts_at_zero():
    # every candidate has Dice 0 (the only lesion voxel scores 0): as the reference
    # (best starting at 0, `>=`), the last candidate is returned, not the first
    sc = np.zeros((4, 4, 4), np.float32)
    lab = np.zeros(sc.shape, bool)
    lab[0, 0, 0] = True
    sc[2:, 2:, 2:] = 0.8
    pool = PooledVoxels()
    pool.add(sc, lab)
    assert greedy_threshold_search(pool, steps=2) == (float(np.float32(0.8)) * 0.125, 0.0)


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


def test_volume_without_lesion_is_left_out_of_the_dice_mean():
    rng = np.random.default_rng(1)
    val = [_volume(f"v{i}", rng) for i in range(2)]
    test = [_volume("t0", rng), _volume("t1", rng)]
    # a test volume with an (empty) segmentation and a perfect reconstruction: nothing
    # predicted, no lesion voxel -> Dice 0/0 = NaN, AUPRC and AUROC undefined
    clean = _volume("t2", rng, lesion=False)
    clean = VolumeResult(
        "t2", clean.image, clean.image, clean.brain_mask, np.zeros_like(clean.brain_mask)
    )
    out = evaluate_split(val, [*test, clean])
    rec = out.records[2]
    assert rec["predicted_voxels"] == 0 and rec["lesion_voxels"] == 0
    assert np.isnan(rec["dice"]) and np.isnan(rec["auprc"]) and np.isnan(rec["auroc"])
    s = summarise(out.records)
    assert s["dice"]["n"] == 2
    assert s["dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in out.records[:2]]))
    ex = exclusions(out.records)
    assert ex["dice"]["n"] == 1 and "0/0" in ex["dice"]["reason"]
    assert ex["auprc"]["n"] == 1 and "dice" in ex and "l1" not in ex
    assert exclusions(out.records[:2]) == {}


def test_report_figures(tmp_path):
    from maediff.reporting.report import (
        figure_dice_distribution,
        figure_examples,
        figure_pr_curves,
        pick_slices,
        write_html,
    )

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
    md = "| Model | BraTS21 Dice (%) |\n|---|---|\n| MAEDiff | 42.07 ± 1.12 |"
    page = write_html(
        tmp_path / "report.html",
        "Report",
        [{"heading": "Results", "table": md, "images": [f1, f2, f3]}],
    )
    text = page.read_text()
    assert "<td>42.07 ± 1.12</td>" in text and "src='ex.png'" in text


@pytest.mark.slow
def test_worker_processes_give_the_in_process_results(tiny_bench, tmp_path, gen):
    """evaluate with 2 single-threaded reconstruction workers = evaluate in process:
    the same per-subject metrics, thresholds and l1 (float rounding of 1 vs 2 threads)."""
    import json

    from conftest import draw_zero_layers
    from maediff.config import get_preset
    from maediff.models import build_model
    from maediff.pipeline.evaluate import evaluate_model

    model = draw_zero_layers(build_model(get_preset("maediff-tiny")), gen).eval()
    here = evaluate_model(model, tiny_bench, tmp_path / "here", workers=0, progress=False)
    pooled = evaluate_model(model, tiny_bench, tmp_path / "pool", workers=2, progress=False)
    here, pooled = here.to_json(), pooled.to_json()
    assert here["scoring"]["workers"] == 0 and pooled["scoring"]["workers"] == 2
    for ds, d in here["datasets"].items():
        p = pooled["datasets"][ds]
        if "threshold" in d:
            assert p["threshold"] == pytest.approx(d["threshold"], rel=1e-4)
        for metric, stats in d["metrics"].items():
            if stats.get("mean") is not None:
                assert p["metrics"][metric]["mean"] == pytest.approx(stats["mean"], abs=1e-4)
    a = (tmp_path / "here" / "Brats21_test_subjects.csv").read_text().splitlines()
    b = (tmp_path / "pool" / "Brats21_test_subjects.csv").read_text().splitlines()
    assert len(a) == len(b) > 1
    assert json.loads((tmp_path / "pool" / "summary.json").read_text())["scoring"]["workers"] == 2
