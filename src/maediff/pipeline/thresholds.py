"""Where the threshold of `maediff detect` comes from (docs/labelfree.md, docs/usage.md):

- a number given on the command line (`--threshold`);
- an evaluation's validation threshold of one data set (`--threshold-from EVAL`,
  `--threshold-dataset`), or its threshold at a false-positive rate on healthy
  validation volumes (with `--fpr`); the maps are then made at the t_test that
  evaluation chose, if it chose one (`t_test_override`);
- a calibration on healthy scans at `--fpr` (`--threshold-from CALIB`, its JSON, or a
  model file that carries one, or the detected model file's own), checked against the
  model: the same weights, configuration and scoring settings (`check_calibration`).

    source = ThresholdSource(threshold=None, origin="runs/eval", dataset="Brats21", fpr=None)
    overrides = t_test_override(source.origin, source.threshold, given_overrides)
    chosen = detect_threshold(source, model)     # .value, .how, .calibration

Every refusal is a ValueError naming the file and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..evaluation.calibration import CALIBRATION_FILE, Calibration
from ..names import TUMOUR, protocol_name
from ..reporting.runs import load_summary
from ..weights import CheckpointError, model_identity, read_checkpoint_metadata, scoring_settings
from .choose_t import T_TEST_KEY, TChoice

if TYPE_CHECKING:
    from ..models import AnomalyModel


@dataclass(frozen=True)
class ThresholdSource:
    """What the command line gave: --threshold, --threshold-from, --threshold-dataset,
    --fpr, and the --model path (named in messages)."""

    threshold: float | None = None
    origin: str | None = None  # an evaluation folder, a calibration, or a model file
    dataset: str = TUMOUR
    fpr: float | None = None
    model_path: str = "the model"


@dataclass(frozen=True)
class DetectThreshold:
    value: float | None  # None: no threshold (maps and scores only)
    how: str | None  # how it was set, for the log and the manifest
    calibration: Calibration | None = None


# ------------------------------------------------------------------ an evaluation


def evaluation_threshold(origin: str | Path, dataset: str) -> float:
    """The validation threshold an evaluation set for `dataset`."""
    d = load_summary(origin).datasets.get(protocol_name(dataset))
    if d is None or d.threshold is None:
        raise ValueError(f"{origin} has no threshold for data set {dataset!r}")
    return float(d.threshold)


def evaluation_fpr_threshold(origin: str | Path, dataset: str, fpr: float) -> tuple[float, str]:
    """The threshold an evaluation set at `fpr` on its healthy validation volumes, and
    how it was set."""
    d = load_summary(origin).datasets.get(protocol_name(dataset))
    free = d.label_free if d is not None else None
    for a in free.at_fpr if free is not None else ():
        if abs(a.fpr - fpr) < 1e-9:
            how = f"{a.threshold:.4g}: {a.fpr:.0%} FPR on {free.thresholds_source} (evaluation {origin})"
            return a.threshold, how
    raise ValueError(
        f"{origin} has no threshold at FPR {fpr:g} for data set {dataset!r} "
        "(evaluations since the label-free results have 0.01, 0.05, 0.1)"
    )


def t_test_override(
    origin: str | Path | None, threshold: float | None, overrides: Sequence[str] = ()
) -> list[str]:
    """The t_test an evaluation chose on validation (evaluate --choose-t), as an override,
    when `origin` names that evaluation, no number was given and `overrides` do not set
    t_test themselves: its threshold belongs to maps made at that t."""
    if not origin or threshold is not None:
        return []
    if any(o.split("=", 1)[0].strip() == T_TEST_KEY for o in overrides):
        return []
    src = Path(origin)
    if not (src / "summary.json").is_file() and src.name != "summary.json":
        return []  # not an evaluation (a calibration, say): no t_test to reuse
    scoring = load_summary(src).scoring  # None in an old evaluation (0.2.0: no choice)
    choice = scoring.t_choice if scoring is not None else None
    return [TChoice.from_json(choice).override()] if choice else []


# ------------------------------------------------------------------ a calibration


def calibration_source(origin: str | Path) -> Calibration | None:
    """The calibration at `origin` (a calibrate output, its JSON, or a model file that
    carries one), or None when `origin` is an evaluation."""
    p = Path(origin)
    if (p / CALIBRATION_FILE).is_file() or (
        p.is_file() and p.suffix == ".json" and p.name != "summary.json"
    ):
        return Calibration.read(p)
    if p.is_file() and p.suffix == ".safetensors":
        cal = read_calibration(p)
        if cal is None:
            raise ValueError(f"{p} carries no calibration (export it with --calibration)")
        return cal
    return None


def _calibration_of(text: str | None, where: str) -> Calibration | None:
    if not text:
        return None
    try:
        return Calibration.from_json(json.loads(text), f"{where} (its calibration)")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: its calibration is not valid JSON: {e}") from e


def read_calibration(path: str | Path) -> Calibration | None:
    """The calibration a model file carries, else None."""
    return _calibration_of(read_checkpoint_metadata(path)[3].get("calibration"), str(path))


def model_calibration(model: AnomalyModel) -> Calibration | None:
    """The calibration the loaded model's file carries (an exported model), else None."""
    info = model.checkpoint_info
    return _calibration_of(info.get("calibration"), info.get("path", "the model file"))


def check_calibration(
    cal: Calibration, model: AnomalyModel, where: str = "the calibration"
) -> None:
    """Refuse a calibration made with other weights, another configuration or other
    scoring settings than `model` uses now (ValueError naming what differs)."""
    mine = model_identity(model)
    for key in ("weights_sha256", "config_sha256"):
        if cal.model.get(key) != mine.get(key):
            raise ValueError(
                f"{where} was made with another model ({key.split('_')[0]} "
                f"{str(cal.model.get(key))[:12]}, this model {str(mine.get(key))[:12]}); "
                "calibrate this model on healthy scans (`maediff calibrate`)"
            )
    now = scoring_settings(model.cfg)
    diff = sorted(k for k in set(now) | set(cal.scoring) if now.get(k) != cal.scoring.get(k))
    if diff:
        pairs = ", ".join(f"{k}: {cal.scoring.get(k)!r} there, {now.get(k)!r} now" for k in diff)
        raise ValueError(
            f"{where} was made with other scoring settings ({pairs}); use the same --set "
            "options, or calibrate again with these"
        )


# ------------------------------------------------------------------ detect's threshold


def check_source(source: ThresholdSource) -> None:
    """What can be checked before the model loads: an evaluation named by
    --threshold-from holds the threshold asked for (a calibration is checked against
    the model once it is loaded)."""
    if source.origin and source.threshold is None and calibration_source(source.origin) is None:
        if source.fpr is None:
            evaluation_threshold(source.origin, source.dataset)
        else:
            evaluation_fpr_threshold(source.origin, source.dataset, source.fpr)


def detect_threshold(source: ThresholdSource, model: AnomalyModel) -> DetectThreshold:
    """The threshold of a detect call (module docstring), checked against the model."""
    cal = calibration_source(source.origin) if source.origin else None
    if cal is None and source.fpr is not None and not source.origin:
        cal = model_calibration(model)
        if cal is None:
            raise ValueError(
                f"--fpr needs a calibration: --threshold-from CALIB (maediff calibrate), or a model "
                f"file that carries one; {source.model_path} carries none"
            )
    if cal is None:
        return _without_calibration(source)
    if source.fpr is None:
        have = " ".join(f"{t.fpr:g}" for t in cal.thresholds)
        raise ValueError(f"give --fpr, one of the calibration's rates: {have}")
    check_calibration(cal, model, f"the calibration {source.origin or source.model_path}")
    return DetectThreshold(cal.threshold(source.fpr), cal.describe(source.fpr), cal)


def _without_calibration(source: ThresholdSource) -> DetectThreshold:
    if source.threshold is not None:
        return DetectThreshold(source.threshold, "given on the command line (--threshold)")
    if not source.origin:
        return DetectThreshold(None, None)
    if source.fpr is not None:
        return DetectThreshold(*evaluation_fpr_threshold(source.origin, source.dataset, source.fpr))
    how = f"{source.dataset} validation threshold of the evaluation {source.origin}"
    return DetectThreshold(evaluation_threshold(source.origin, source.dataset), how)


__all__ = [
    "DetectThreshold",
    "ThresholdSource",
    "calibration_source",
    "check_calibration",
    "check_source",
    "detect_threshold",
    "evaluation_fpr_threshold",
    "evaluation_threshold",
    "model_calibration",
    "read_calibration",
    "t_test_override",
]
