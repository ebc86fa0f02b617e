"""Operating points (docs/evaluation.md §1, step 5).

The Dice threshold is chosen on the pooled voxels of the *unhealthy validation*
split and applied unchanged to the test split. `PooledVoxels` keeps only voxels with
a positive score (every threshold searched is > 0, so zero-score voxels are always
predicted healthy) plus the number of lesion voxels among the rest, so memory is
about 5 bytes per brain voxel instead of per volume voxel: for BraTS21's 100
validation volumes at 96x96x50 that is at most 100 * 460,800 * 5 B = 230 MB, and
in practice (brain about a third of the volume) about 80 MB.
"""

from __future__ import annotations

import numpy as np


class PooledVoxels:
    """Scores and labels of many volumes pooled into one set of voxels."""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.missed_positives = 0  # lesion voxels with score <= 0
        self.n_volumes = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        if scores.shape != labels.shape:
            raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
        keep = scores > 0
        lab = labels.astype(bool)
        self._scores.append(scores[keep].astype(np.float32))
        self._labels.append(lab[keep])
        self.missed_positives += int(lab[~keep].sum())
        self.n_volumes += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._scores:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        return np.concatenate(self._scores), np.concatenate(self._labels)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._scores) + sum(a.nbytes for a in self._labels)


def _pooled_dice(scores: np.ndarray, labels: np.ndarray, threshold: float, extra_pos: int) -> float:
    pred = scores > threshold
    tp = int(np.count_nonzero(pred & labels))
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(labels)) + extra_pos
    return 2.0 * tp / denom if denom else 1.0


def greedy_threshold_search(pool: PooledVoxels, steps: int = 10) -> tuple[float, float]:
    """Interval-halving search for the Dice-optimal threshold over [0, max score].

    Each step scores the quarter points of the current interval (predict score >
    threshold), keeps the half around the better one (the lower one on equal Dice),
    and remembers the best seen. As the reference (pDDPM's find_best_val), the best
    starts at (0.0, 0.0) and a later candidate with an equal Dice replaces it (`>=`).
    Returns (threshold, pooled Dice). With no positive score at all: (0.0, 0.0).
    """
    scores, labels = pool.arrays()
    if scores.size == 0:
        return 0.0, 0.0
    lo, hi = 0.0, float(scores.max())
    best_t, best_d = 0.0, 0.0
    for _ in range(steps):
        q_lo, q_hi = lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo)
        d_lo = _pooled_dice(scores, labels, q_lo, pool.missed_positives)
        d_hi = _pooled_dice(scores, labels, q_hi, pool.missed_positives)
        mid = lo + 0.5 * (hi - lo)
        if d_lo >= d_hi:
            cand, d, (lo, hi) = q_lo, d_lo, (lo, mid)
        else:
            cand, d, (lo, hi) = q_hi, d_hi, (mid, hi)
        if d >= best_d:  # ties: the later candidate wins, as the reference
            best_t, best_d = cand, d
    return best_t, best_d


def fpr_threshold(healthy_scores: np.ndarray, fpr: float) -> float:
    """Threshold at which a fraction `fpr` of pooled healthy voxels (e.g. brain voxels of
    healthy validation volumes) score above it: their (1 - fpr) quantile."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr={fpr} must be in (0, 1)")
    if healthy_scores.size == 0:
        raise ValueError("no healthy voxels to set a false-positive-rate threshold")
    return float(np.quantile(healthy_scores, 1 - fpr))
