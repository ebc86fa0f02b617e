"""pipeline/thresholds.py: where detect's threshold comes from (a number, an
evaluation's validation threshold or its threshold at an FPR, a calibration), read
through its public names; the command line only parses (tests/test_cli.py runs it)."""

import json
import shutil
from pathlib import Path

import pytest

from maediff.evaluation.calibration import Calibration, FprThreshold
from maediff.pipeline.thresholds import (
    ThresholdSource,
    calibration_source,
    check_source,
    detect_threshold,
    evaluation_fpr_threshold,
    evaluation_threshold,
    t_test_override,
)

EVAL = Path(__file__).resolve().parent / "fixtures" / "v0.2.0" / "eval"  # written by 0.2.0


def test_an_evaluation_gives_its_validation_threshold_per_data_set():
    assert evaluation_threshold(EVAL, "BraTS21") == pytest.approx(0.09135134721873328)
    assert evaluation_threshold(EVAL, "mslub") == pytest.approx(0.29470393134397455)
    with pytest.raises(ValueError, match="has no threshold for data set 'IXI'"):
        evaluation_threshold(EVAL, "IXI")


def test_an_evaluation_without_label_free_results_has_no_fpr_threshold():
    with pytest.raises(ValueError, match="no threshold at FPR 0.05 for data set 'Brats21'"):
        evaluation_fpr_threshold(EVAL, "Brats21", 0.05)
    with pytest.raises(ValueError, match="no threshold at FPR 0.05"):
        check_source(ThresholdSource(origin=str(EVAL), dataset="Brats21", fpr=0.05))


def test_the_threshold_without_a_calibration_says_how_it_was_set():
    model = None  # no calibration is asked of the model on these paths
    given = detect_threshold(ThresholdSource(threshold=0.2), model)
    assert (given.value, given.how, given.calibration) == (
        0.2,
        "given on the command line (--threshold)",
        None,
    )
    chosen = detect_threshold(ThresholdSource(origin=str(EVAL), dataset="Brats21"), model)
    assert chosen.value == pytest.approx(0.0913513)
    assert chosen.how == f"Brats21 validation threshold of the evaluation {EVAL}"
    assert detect_threshold(ThresholdSource(), model).value is None


def test_an_evaluation_is_no_calibration_and_a_0_2_0_one_chose_no_t():
    assert calibration_source(EVAL) is None
    assert t_test_override(EVAL, None, []) == []


def test_a_calibration_file_is_read_and_needs_an_fpr(tmp_path):
    at = FprThreshold(0.05, 0.3, None, None, 0.01, 1)
    cal = Calibration([at], ["a"], [0.1], 100, {"weights_sha256": "w"}, {}, {}, source="x")
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(cal.to_json()))
    assert calibration_source(path) is not None
    with pytest.raises(ValueError, match="give --fpr, one of the calibration's rates: 0.05"):
        detect_threshold(ThresholdSource(origin=str(path)), None)


def test_a_model_file_without_a_calibration_is_named(tmp_path):
    shutil.copy(EVAL.parent / "run" / "best.safetensors", tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="m.safetensors carries no calibration"):
        calibration_source(tmp_path / "m.safetensors")
