"""evaluation/numbers.py: every number an evaluation reports is computed from the
protocol's run by pure functions, checked here against values worked out by hand."""

import math

import pytest

from maediff.evaluation.numbers import run_numbers, scan_scores
from maediff.evaluation.protocol import DatasetRun, EvalOutcome, EvalSettings, EvaluationRun


def _volume(dice, score, lesions=1, detected=1, fp=0, **extra):
    return {
        "dice": dice,
        "auprc": dice,
        "anomaly_score": score,
        "lesions": lesions,
        "lesions_detected": detected,
        "fp_components": fp,
        "lesion_ml": 5.0,
        **extra,
    }


def _run(healthy_scores=(0.1, 0.2, 0.3)):
    records = [_volume(0.5, 0.25), _volume(0.7, 0.35, detected=0, fp=2), _volume(math.nan, 0.05)]
    rows = [{"volume_ml": 1.0, "detected": True}, {"volume_ml": 30.0, "detected": False}]
    outcome = EvalOutcome(threshold=0.2, val_dice=0.6, records=records, lesions=rows)
    healthy = [{"l1": v, "anomaly_score": s} for v, s in zip((1.0, 2.0, 4.0), healthy_scores)]
    return EvaluationRun(
        datasets={"Brats21": DatasetRun(n_val=2, n_test=3, outcome=outcome)},
        fpr_thresholds=None,
        fpr_source="",
        healthy=healthy,
    )


def test_means_sds_and_the_volumes_left_out():
    n = run_numbers(_run(), EvalSettings())
    d = n.datasets["Brats21"]
    assert d.metrics["dice"]["mean"] == pytest.approx(0.6)
    assert d.metrics["dice"]["std"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.5, 0.7
    assert d.metrics["dice"]["n"] == 2
    assert d.excluded["dice"]["n"] == 1
    assert n.healthy.metrics["l1"]["mean"] == pytest.approx(7 / 3)


def test_scan_auroc_against_the_healthy_test_volumes():
    # unhealthy scores 0.25, 0.35, 0.05 against healthy 0.1, 0.2, 0.3: of the 9 pairs the
    # unhealthy scan ranks higher in 2 + 3 + 0 = 5
    d = run_numbers(_run(), EvalSettings()).datasets["Brats21"]
    assert d.scan_auroc == pytest.approx(5 / 9)
    assert d.n_healthy == 3
    no_healthy = _run()
    no_healthy.healthy = None
    n = run_numbers(no_healthy, EvalSettings())
    assert (n.datasets["Brats21"].scan_auroc, n.healthy) == (None, None)


def test_the_lesion_summary_pools_the_volumes():
    d = run_numbers(_run(), EvalSettings()).datasets["Brats21"]
    assert d.lesions["lesions"] == 3 and d.lesions["sensitivity"] == pytest.approx(2 / 3)
    assert d.at_fpr == ()  # no healthy validation thresholds


def test_a_volume_without_a_score_is_nan():
    assert math.isnan(scan_scores([{"dice": 0.1}])[0])
