"""Healthy scans -> thresholds at false-positive rates (`maediff calibrate`, docs/labelfree.md).

    cal = calibrate_files(read_inputs("controls/"), "calib/", load_model("runs/mine"), fprs=(0.01, 0.05))
    detect_files(..., threshold=cal.threshold(0.01), calibration=cal)

Each healthy scan is reconstructed and scored exactly as `detect` does
(detect.anomaly_maps, the same seed for every scan); the thresholds are set on the
pooled brain voxels of the score maps (evaluation/calibration.py). OUT/calibration.json
is written last, after calibration.md (the thresholds in words) and scans.csv (each
calibration scan's scalar scores), each to a temporary name renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..data.datasets import load_subject
from ..data.io import DataError, Subject
from ..evaluation.calibration import CALIBRATION_FILE, N_BOOT, Calibration, HealthyScan, calibrate
from ..evaluation.protocol import EvalSettings
from ..outputs import check_outputs, record_outputs, write_text_atomic
from ..weights import model_identity, scoring_settings
from .detect import anomaly_maps
from .scores import ScoresTable, scan_scores_of

if TYPE_CHECKING:
    from ..models import AnomalyModel


def healthy_scan(
    model: AnomalyModel,
    subject: Subject,
    seed: int,
    batch_size: int | None = None,
    amp: str | None = None,
) -> tuple[HealthyScan, dict]:
    """One healthy scan's score map as detect computes it, and its scalar scores."""
    vol = load_subject(subject, model.cfg.data)
    _, _, scores = anomaly_maps(model, vol, torch.Generator().manual_seed(seed), batch_size, amp)
    voxel_ml = float(abs(np.linalg.det(vol.affine[:3, :3]))) / 1000.0
    return HealthyScan(subject.name, scores, vol.brain_mask, voxel_ml), scan_scores_of(
        vol, scores, None
    )


def refuse_labelled(subjects: Sequence[Subject], source: str) -> None:
    labelled = [s.name for s in subjects if s.seg is not None]
    if labelled:
        raise DataError(
            f"{source}: {len(labelled)} scan(s) have lesion labels ({', '.join(labelled[:3])}); "
            "calibrate on healthy scans only (for BIDS: --participants group=control)"
        )


def calibrate_files(
    subjects: Sequence[Subject],
    out_dir: str | Path,
    model: AnomalyModel,
    fprs: Sequence[float] = (0.01, 0.05),
    seed: int = 0,
    n_boot: int = N_BOOT,
    source: str = "",
    overwrite: bool = False,
    batch_size: int | None = None,
    amp: str | None = None,
    progress: bool = True,
    input_lists: Sequence[str | Path] = (),
) -> Calibration:
    """Thresholds of `model` at `fprs` on the healthy `subjects`, written to `out_dir`
    (CALIBRATE_FILES; checked before any work: check_calibrate_arguments)."""
    out = Path(out_dir)
    inputs = [p for s in subjects for p in (s.image, s.mask, s.seg)]
    check_calibrate_arguments(out, fprs, n_boot, overwrite, [*inputs, *input_lists])
    refuse_labelled(subjects, source or "the calibration scans")
    scans, table = [], ScoresTable(out / "scans.csv", False, {})
    for s in tqdm(subjects, desc="calibrating", unit="scan", disable=not progress):
        scan, scores = healthy_scan(model, s, seed, batch_size, amp)
        scans.append(scan)
        table.put(s, scores, None, None, source if Path(source).is_dir() else None)
    post = EvalSettings()
    cal = calibrate(
        scans,
        fprs,
        model=model_identity(model),
        scoring=scoring_settings(model.cfg),
        postprocess={
            "erosion_iterations": post.erosion_iterations,
            "median_size": post.median_size,
            "min_component": post.min_component,
        },
        n_boot=n_boot,
        seed=seed,
        source=source,
        version=__version__,
    )
    record_outputs(out, "calibrate", CALIBRATE_FILES)
    table.write()
    write_text_atomic(out / "calibration.md", calibration_text(cal))
    write_text_atomic(out / CALIBRATION_FILE, json.dumps(cal.to_json(), indent=2) + "\n")  # last
    return cal


CALIBRATE_FILES = ("scans.csv", "calibration.md", CALIBRATION_FILE)


def check_calibrate_arguments(
    out_dir: str | Path,
    fprs: Sequence[float],
    n_boot: int,
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] = (),
) -> None:
    """What would fail after every scan was reconstructed, checked first: rates that
    are not fractions, a bootstrap of fewer than one resample, and the output rule
    (outputs.py): a calibration is replaced only with `overwrite`, an input never."""
    for f in fprs:
        if not (isinstance(f, int | float) and 0 < f < 1):
            raise ValueError(
                f"--fpr {f:g} is not a rate: give fractions in (0, 1), e.g. 0.01 for 1 %"
            )
    if n_boot < 1:
        raise ValueError(f"--bootstrap {n_boot} must be >= 1 (resamples of the scans)")
    out = Path(out_dir)
    if (out / CALIBRATION_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a calibration; use --overwrite to replace it")
    check_outputs(out, "calibrate", CALIBRATE_FILES, overwrite, inputs)


def calibration_text(cal: Calibration) -> str:
    """The calibration in words (calibration.md)."""
    ident = cal.model
    lines = [
        f"# Calibration of {ident.get('name', '?')} ({ident.get('model', '?')})",
        "",
        f"- healthy scans: {cal.n_scans} ({cal.source or 'unnamed'}), {cal.n_voxels:,} brain voxels",
        f"- weights sha256 {str(ident.get('weights_sha256', '-'))[:16]}, config sha256 "
        f"{str(ident.get('config_sha256', '-'))[:16]}",
        f"- bootstrap over scans: {cal.n_boot} resamples"
        if cal.n_boot
        else "- no bootstrap (one scan)",
        "",
        "| FPR | threshold | 95 % interval | voxel FPR after small components | scans flagged |",
        "|---|---|---|---|---|",
    ]
    for t in cal.thresholds:
        ci = f"{t.ci_low:.4g}-{t.ci_high:.4g}" if t.ci_low is not None else "-"
        lines.append(
            f"| {t.fpr:g} | {t.threshold:.4g} | {ci} | {t.voxel_fpr_after_components:.3%} "
            f"| {t.scans_flagged} of {cal.n_scans} |"
        )
    lines += ["", *(f"Warning: {w}" for w in cal.warnings)]
    return "\n".join(lines).rstrip("\n") + "\n"


__all__ = [
    "CALIBRATE_FILES",
    "calibrate_files",
    "calibration_text",
    "check_calibrate_arguments",
    "healthy_scan",
]
