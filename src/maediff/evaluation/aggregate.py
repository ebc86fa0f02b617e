"""Aggregation: mean and std over volumes, and over folds or seeds; CSV and JSON."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import write_text_atomic

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


def summarise(
    records: Sequence[dict], metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, float]]:
    """Mean, std (population, as numpy) and count over volumes for each metric present;
    NaN entries (undefined metrics, e.g. AUPRC without lesion voxels) are left out."""
    out: dict[str, dict[str, float]] = {}
    for m in metrics:
        vals = np.array([r[m] for r in records if m in r and r[m] is not None], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        if vals.size:
            out[m] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(vals.size)}
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


def write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)  # a temporary name (outputs.py), then one rename


def write_subject_csv(
    records: Sequence[dict], path: str | Path, context: dict[str, Any] | None = None
) -> None:
    """One row per volume; `context` columns (split, model, threshold) are repeated on each row."""
    context = context or {}
    cols: list[str] = list(context)
    for r in records:
        cols += [k for k in r if k not in cols]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in records:
        w.writerow({**context, **{k: _fmt(v) for k, v in r.items()}})
    write_atomic(Path(path), buf.getvalue())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def write_json(obj: dict, path: str | Path) -> None:
    write_atomic(Path(path), json.dumps(_clean(obj), indent=2))
