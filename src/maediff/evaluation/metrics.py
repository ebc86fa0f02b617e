"""Per-volume metrics (docs/evaluation.md §1, steps 4 and 7).

Average precision and AUROC follow scikit-learn's definitions (step-wise AP without
interpolation; trapezoidal ROC area) and are computed from one sort of the scores.

Edge cases, by convention (docs/evaluation.md §2):
- no lesion voxels: AP and AUROC are NaN (undefined) and left out of the means;
- no healthy voxels: AUROC is NaN;
- Dice is the reference's 2|P & G| / (|P| + |G|): an empty prediction against an
  empty ground truth is 0/0 = NaN, left out of the mean (the reference's nanmean);
  a prediction on a volume without lesion voxels, or an empty prediction on one
  with lesions, is 0;
- ties: voxels with equal scores enter the curves together (one threshold).
"""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P & G| / (|P| + |G|) over boolean arrays of equal shape; NaN (0/0, as the
    reference) when both are empty."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    p, g = pred.astype(bool), gt.astype(bool)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def _curve_counts(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct score, thresholds descending."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size} values) and labels ({y.size} values) differ in size")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps, s[last]


def precision_recall_curve(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and thresholds (descending); recall is NaN without positives."""
    tps, fps, thr = _curve_counts(scores, labels)
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / tps[-1] if tps.size and tps[-1] > 0 else np.full(tps.shape, np.nan)
    return precision, recall, thr


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n (scikit-learn's average_precision_score)."""
    precision, recall, _ = precision_recall_curve(scores, labels)
    if recall.size == 0 or np.isnan(recall[-1]):
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids); NaN when only one class is present."""
    tps, fps, _ = _curve_counts(scores, labels)
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """ORACLE: the best Dice over all thresholds of this volume's own scores, and that
    threshold (predict score >= threshold). Uses the ground truth of the volume it
    scores, so it is an upper bound, never a result."""
    tps, fps, thr = _curve_counts(scores, labels)
    n_pos = int(np.asarray(labels).astype(bool).sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    d = 2 * tps / (tps + fps + n_pos)
    i = int(np.argmax(d))
    return float(d[i]), float(thr[i])
