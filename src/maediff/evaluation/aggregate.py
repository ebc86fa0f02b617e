"""Aggregation: mean, std and count of each metric over volumes, and over folds or seeds,
and the volumes each mean leaves out (the files they go to: reporting/files.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = (
    "dice",
    "auprc",
    "auroc",
    "l1",
    "l1_healthy",
    "l1_anomalous",
    "anomaly_score",
    "oracle_best_dice",
)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1: the n - 1 denominator) of `values`;
    the sd is NaN for fewer than two values, the mean for none. The one "mean ± sd"
    of maediff's summaries, tables and pages (docs/evaluation.md §4)."""
    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean()) if a.size else math.nan
    return mean, float(a.std(ddof=1)) if a.size > 1 else math.nan


def stats(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "std", "n"} of values (mean_sd; "std" None for a single value)."""
    mean, sd = mean_sd(values)
    return {"mean": mean, "std": None if math.isnan(sd) else sd, "n": len(values)}


def summarise(
    records: Sequence[dict], metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, Any]]:
    """Mean, sample sd (mean_sd) and count over volumes for each metric present; NaN
    entries (undefined metrics, e.g. AUPRC without lesion voxels) are left out."""
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        vals = np.array([r[m] for r in records if m in r and r[m] is not None], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        if vals.size:
            out[m] = stats(vals)
    return out


# Why a volume's value of a metric can be undefined (NaN), for the summary and report.
EXCLUSION_REASONS = {
    "dice": "no lesion voxels and an empty prediction (0/0, left out as in the reference nanmean)",
    "auprc": "no lesion voxels (average precision undefined)",
    "auroc": "only one class of voxels (no lesion or no healthy voxel)",
    "oracle_best_dice": "no lesion voxels",
    "l1": "empty volume",
    "l1_healthy": "no healthy brain voxels",
    "l1_anomalous": "no lesion voxels",
    "anomaly_score": "no brain voxels",
}


def _undefined(v: Any) -> bool:
    return v is None or (isinstance(v, float | np.floating) and math.isnan(v))


def exclusions(
    records: Sequence[dict], metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, Any]]:
    """How many volumes `summarise` left out of each metric's mean, and why:
    {metric: {"n": count, "reason": text}} for metrics with at least one left out."""
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        n = sum(1 for r in records if m in r and _undefined(r[m]))
        if n:
            out[m] = {"n": n, "reason": EXCLUSION_REASONS.get(m, "undefined (NaN)")}
    return out
