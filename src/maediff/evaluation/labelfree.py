"""Label-free results of an evaluation (docs/evaluation.md §Label-free results).

Beside the protocol's threshold (chosen on labelled unhealthy validation volumes: the
Table 1 number), an evaluation reports what a user without lesion labels would get:

- Dice and lesion-wise F1 at thresholds set at false-positive rates (settings.fprs,
  1 / 5 / 10 %) on the pooled brain voxels of the *healthy validation* volumes
  (thresholds.fpr_threshold), as the label-free benchmarks do;
- the scan-level AUROC of the scan score (`anomaly_score`: mean of the top 1 % of the
  brain-voxel scores) between the healthy test volumes and each unhealthy test set:
  "is this scan abnormal?".

    thresholds = fpr_thresholds(healthy_brain_scores, (0.01, 0.05))   # {"fpr1": t, "fpr5": t}
    rec.update(fixed_fpr_metrics(scores, gt, thresholds, min_component=7, ...))
    fixed_fpr_summary(records, thresholds, fprs), scan_auroc(healthy, unhealthy)

Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .aggregate import stats
from .lesions import lesion_rows
from .metrics import dice, roc_auc
from .postprocess import remove_small_components
from .thresholds import fpr_threshold


def fpr_key(fpr: float) -> str:
    """fpr 0.01 -> 'fpr1' (the key of EvalOutcome.fpr_thresholds and of the records)."""
    return f"fpr{round(fpr * 100):d}"


def fpr_thresholds(healthy_scores: Sequence[np.ndarray], fprs: Sequence[float]) -> dict[str, float]:
    """Thresholds at `fprs` over the pooled brain-voxel scores of healthy volumes."""
    pooled = np.concatenate(list(healthy_scores)) if healthy_scores else np.zeros(0, np.float32)
    return {fpr_key(f): fpr_threshold(pooled, f) for f in fprs}


def fixed_fpr_metrics(
    scores: np.ndarray,
    gt: np.ndarray,
    thresholds: Mapping[str, float],
    min_component: int,
    overlap: float = 0.0,
    voxel_ml: float = 1e-3,
) -> dict[str, Any]:
    """Per threshold KEY: dice_KEY, lesions_detected_KEY and fp_components_KEY of one
    test volume, the prediction made as the protocol's (small components removed)."""
    out: dict[str, Any] = {}
    for key, t in thresholds.items():
        pred = remove_small_components(scores > t, min_component)
        _, counts = lesion_rows(pred, gt, voxel_ml, overlap)
        out[f"dice_{key}"] = dice(pred, gt)
        out[f"lesions_detected_{key}"] = counts["lesions_detected"]
        out[f"fp_components_{key}"] = counts["fp_components"]
    return out


def fixed_fpr_summary(
    records: Sequence[dict], thresholds: Mapping[str, float], fprs: Sequence[float]
) -> list[dict[str, Any]]:
    """Per false-positive rate: its threshold, mean Dice (std, n) over the test volumes
    and lesion-wise F1, sensitivity and false-positive components per volume pooled
    over them (as lesions.lesion_summary)."""
    out = []
    labelled = [r for r in records if "lesions" in r]
    for f in fprs:
        key = fpr_key(f)
        if key not in thresholds:
            continue
        d = np.array([r[f"dice_{key}"] for r in labelled if f"dice_{key}" in r], np.float64)
        d = d[~np.isnan(d)]
        tp = sum(r.get(f"lesions_detected_{key}", 0) for r in labelled)
        n = sum(r["lesions"] for r in labelled)
        fp = sum(r.get(f"fp_components_{key}", 0) for r in labelled)
        denom = 2 * tp + (n - tp) + fp
        out.append(
            {
                "fpr": f,
                "threshold": thresholds[key],
                "dice": stats(d) if d.size else None,
                "lesion_f1": 2 * tp / denom if denom else None,
                "sensitivity": tp / n if n else None,
                "fp_per_volume": fp / len(labelled) if labelled else None,
            }
        )
    return out


def scan_auroc(healthy: Sequence[float], unhealthy: Sequence[float]) -> float | None:
    """AUROC of scan scores, unhealthy (positive) against healthy scans; None when
    either group is empty. Scans without a score (NaN) are left out."""
    h = np.array([v for v in healthy if v is not None and math.isfinite(v)], np.float64)
    u = np.array([v for v in unhealthy if v is not None and math.isfinite(v)], np.float64)
    if h.size == 0 or u.size == 0:
        return None
    scores = np.concatenate([h, u])
    labels = np.concatenate([np.zeros(h.size, bool), np.ones(u.size, bool)])
    return float(roc_auc(scores, labels))


__all__ = [
    "fixed_fpr_metrics",
    "fixed_fpr_summary",
    "fpr_key",
    "fpr_thresholds",
    "scan_auroc",
]
