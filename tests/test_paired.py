"""evaluation/paired.py: paired differences over subjects and test-set sizes, against
hand computations, textbook values and simulation."""

import numpy as np
import pytest
from scipy import stats

from maediff.evaluation.paired import (
    bootstrap_ci,
    paired_difference,
    power_paired_t,
    subjects_needed,
)


def test_seeds_are_averaged_per_subject_before_the_difference():
    a = np.array([[0.5, 0.6, 0.7], [0.7, 0.6, 0.9]])  # 2 seeds x 3 subjects
    b = np.array([0.5, 0.5, 0.5])
    d = paired_difference(a, b)
    assert d.n == 3
    assert d.mean == pytest.approx((0.1 + 0.1 + 0.3) / 3)
    assert d.sd == pytest.approx(np.std([0.1, 0.1, 0.3], ddof=1))
    assert d.p_t == pytest.approx(stats.ttest_1samp([0.1, 0.1, 0.3], 0).pvalue)


def test_nan_subjects_are_dropped_and_mismatched_rows_refused():
    d = paired_difference(np.array([0.2, np.nan, 0.4]), np.array([0.1, 0.3, 0.1]))
    assert d.n == 2 and d.mean == pytest.approx(0.2)
    with pytest.raises(ValueError, match="different subjects"):
        paired_difference(np.zeros(3), np.zeros(4))


def test_bootstrap_interval_of_a_constant_is_the_constant_and_otherwise_near_normal():
    assert bootstrap_ci(np.full(10, 0.03)) == pytest.approx((0.03, 0.03))
    d = np.random.default_rng(1).normal(0.02, 0.05, size=200)
    lo, hi = bootstrap_ci(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert bootstrap_ci(d) == bootstrap_ci(d)  # seeded


def test_a_clear_difference_is_resolved_and_a_noisy_one_is_not():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.3, 0.7, size=40)
    assert paired_difference(b + 0.05 + rng.normal(0, 0.02, 40), b).resolved()
    assert not paired_difference(b[:3] + rng.normal(0, 0.05, 3), b[:3]).resolved()


def test_subjects_needed_matches_the_textbook_value():
    # effect size d_z = 0.5, two-sided alpha 0.05, power 0.8: 34 pairs (G*Power)
    assert subjects_needed(sd_diff=1.0, delta=0.5) == 34
    assert subjects_needed(sd_diff=0.06, delta=0.03) == 34
    # d_z = 0.8: 15 pairs
    assert subjects_needed(sd_diff=1.0, delta=0.8) == 15


def test_power_agrees_with_simulation():
    n, sd, delta = 12, 0.08, 0.06
    rng = np.random.default_rng(3)
    d = rng.normal(delta, sd, size=(20_000, n))
    p = stats.ttest_1samp(d, 0.0, axis=1).pvalue
    assert power_paired_t(n, sd, delta) == pytest.approx(float((p < 0.05).mean()), abs=0.015)


def test_the_paired_table_spells_the_data_set_as_shown_and_says_what_is_resolved():
    from maediff.evaluation.paired import paired_rows
    from maediff.reporting.comparison import paired_markdown, resolved_sentence

    ref = {"Brats21/dice": {f"s{i}": 0.5 for i in range(3)}}
    ae = {"Brats21/dice": {"s0": 0.52, "s1": 0.51, "s2": 0.50}}
    rows = paired_rows({"MAEDiff": ref, "AE": ae}, "MAEDiff")
    md = paired_markdown(rows)
    assert "| AE | BraTS21 Dice | 3 subjects | +1.00 | [+0.00, +2.00] |" in md
    assert md.rstrip().endswith("| not resolved |")  # 3 subjects: Wilcoxon p >= 0.25
    assert resolved_sentence(rows) == (
        "Resolved against MAEDiff: none; not resolved: AE (BraTS21 Dice)."
    )


def _eval_folder(path, dice_by_set):
    path.mkdir(parents=True)
    for ds, values in dice_by_set.items():
        rows = ["subject,dice,auprc"] + [f"s{i:02d},{v},{v}" for i, v in enumerate(values)]
        (path / f"{ds}_test_subjects.csv").write_text("\n".join(rows) + "\n")
    return path


def test_power_sizing_script_reads_seeds_and_sizes_from_the_spread(tmp_path):
    """benchmarks/power_sizing.py: seeds averaged per subject, the spread of the
    differences and the subjects a 3-point difference needs (subjects_needed)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "power_sizing.py"
    spec = importlib.util.spec_from_file_location("power_sizing", script)
    power_sizing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(power_sizing)
    rng = np.random.default_rng(3)
    base = {"Brats21": rng.uniform(0.3, 0.8, 20), "MSLUB": rng.uniform(0.0, 0.2, 10)}
    shift = {"Brats21": rng.normal(0.02, 0.06, 20), "MSLUB": rng.normal(0.0, 0.03, 10)}
    # row a: two seeds whose mean is `base`; row b: base - shift
    noise = rng.normal(0, 0.05, 20)
    a = [
        _eval_folder(tmp_path / "a0", {**base, "Brats21": base["Brats21"] + noise}),
        _eval_folder(tmp_path / "a1", {**base, "Brats21": base["Brats21"] - noise}),
    ]
    b = [_eval_folder(tmp_path / "b0", {k: base[k] - shift[k] for k in base})]
    row = power_sizing.sizing(a, b, "Brats21", "dice", 0.03)
    sd = shift["Brats21"].std(ddof=1)
    assert row["subjects"] == 20 and row["data set"] == "BraTS21"
    assert row["mean a - b"] == pytest.approx(100 * shift["Brats21"].mean())
    assert row["sd of differences"] == pytest.approx(100 * sd)
    assert row["subjects for 3 points"] == subjects_needed(sd, 0.03)
    d = paired_difference(
        np.mean([base["Brats21"] + noise, base["Brats21"] - noise], axis=0),
        base["Brats21"] - shift["Brats21"],
    )
    assert row["95 % interval"] == f"{100 * d.ci[0]:+.2f} to {100 * d.ci[1]:+.2f}"
    assert row["p (paired t)"] == f"{d.p_t:.2g}"
    # a row evaluated on other subjects is refused, naming the file
    _eval_folder(tmp_path / "c0", {"Brats21": base["Brats21"][:5], "MSLUB": base["MSLUB"]})
    with pytest.raises(SystemExit, match="c0.*same test subjects"):
        power_sizing.sizing([a[0], tmp_path / "c0"], b, "Brats21", "dice", 0.03)


def test_power_sizing_pairs_two_folders_probes_over_their_slices(tmp_path):
    """--metric probe: each slice's l1 averaged over its draws (band-major, slice-minor)
    and the row's seeds, then paired across the rows; other draws are refused."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "power_sizing.py"
    spec = importlib.util.spec_from_file_location("power_sizing", script)
    power_sizing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(power_sizing)
    rng = np.random.default_rng(5)

    def run(name, per_draw, seed=1):  # 3 draws x 8 slices
        (tmp_path / name / "eval").mkdir(parents=True)
        probe = {"l1": 0.0, "bands": [{"t": [1, 10]}], "n_draws": 24, "n_slices": 8}
        probe |= {"seed": seed, "per_draw": per_draw.ravel().tolist()}
        (tmp_path / name / "probe.json").write_text(json.dumps({"probe": probe}))
        return tmp_path / name / "eval"

    a = [rng.uniform(0.1, 0.2, (3, 8)) for _ in range(2)]
    b = rng.uniform(0.1, 0.2, (3, 8))
    row = power_sizing.probe_sizing([run("a0", a[0]), run("a1", a[1])], [run("b0", b)])
    per_slice = (a[0].mean(0) + a[1].mean(0)) / 2 - b.mean(0)
    assert row["probe slices"] == 8
    assert row["mean a - b"] == pytest.approx(100 * per_slice.mean(), rel=1e-12)
    assert row["sd of differences"] == pytest.approx(100 * per_slice.std(ddof=1), rel=1e-9)
    with pytest.raises(SystemExit, match="other probe draws"):
        power_sizing.probe_sizing([tmp_path / "a0" / "eval", run("c0", b, seed=2)], [])


def test_power_stays_a_number_far_in_the_tail():
    """scipy's noncentral t returns NaN far in its tail (n 12, d_z 2.5): the power is
    then ~1 either way round, not NaN (power_sizing.py printed "nan")."""
    assert power_paired_t(12, 0.0118, 0.03) == pytest.approx(1.0, abs=1e-6)
    assert power_paired_t(12, 0.0118, -0.03) == pytest.approx(1.0, abs=1e-6)
