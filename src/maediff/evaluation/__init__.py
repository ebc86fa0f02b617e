"""The evaluation protocol of paper §4.4 / docs/evaluation.md §1 as pure functions on arrays.

Nothing here imports torch or a model, writes a file or imports maediff.reporting
(tested): inputs are NumPy volumes (X, Y, Z) with Z the axial slice axis, as nibabel
loads them. What an evaluation writes and shows (CSVs, summary.json, tables, figures,
the report) is maediff.reporting, built on these functions.
"""

from .metrics import average_precision, best_dice, dice, precision_recall_curve, roc_auc
from .postprocess import (
    anomaly_scores,
    erode_mask_slicewise,
    median_filter_3d,
    remove_small_components,
)
from .protocol import VolumeResult, evaluate_split, score_volume
from .thresholds import PooledVoxels, fpr_threshold, greedy_threshold_search

__all__ = [
    "PooledVoxels",
    "VolumeResult",
    "anomaly_scores",
    "average_precision",
    "best_dice",
    "dice",
    "erode_mask_slicewise",
    "evaluate_split",
    "fpr_threshold",
    "greedy_threshold_search",
    "median_filter_3d",
    "precision_recall_curve",
    "remove_small_components",
    "roc_auc",
    "score_volume",
]
