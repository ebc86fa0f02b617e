"""Results by lesion (beyond the paper; docs/evaluation.md §Results by lesion).

A lesion is a connected component of the ground truth, 26-connected in 3-D (the
connectivity of the protocol's small-component removal). Per test volume, with the
binary prediction of the protocol (threshold from validation, small components removed):

- a lesion is **detected** when the prediction covers more than `overlap` of its voxels
  (default 0: at least one voxel, the usual lesion-wise rule);
- a **false-positive component** is a connected component of the prediction that
  touches no lesion voxel;
- lesion-wise F1 = 2 TP / (2 TP + FN + FP) with TP the detected lesions, FN the missed
  ones and FP the false-positive components (pooled over volumes for a data set).

Volumes are measured in millilitres from the voxel size of the evaluation grid. The
summary groups lesions by their own volume and volumes by their total lesion volume,
in the bands of BANDS_ML, and states the counts.

    rows, counts = lesion_rows(pred, gt, voxel_ml=0.008)
    summary = lesion_summary(records, rows)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

BANDS_ML = (0.0, 0.1, 1.0, 10.0, 50.0, math.inf)  # lesion-volume bands, ml
STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
OVERLAP_RULE = (
    "a ground-truth component (26-connected) is detected when the prediction covers more "
    "than {overlap:.0%} of its voxels; a predicted component touching no lesion voxel is a "
    "false positive"
)


def band_label(lo: float, hi: float) -> str:
    return f"≥ {lo:g} ml" if math.isinf(hi) else f"{lo:g}-{hi:g} ml"


def band_of(ml: float, bands: Sequence[float] = BANDS_ML) -> int:
    for i in range(len(bands) - 1):
        if bands[i] <= ml < bands[i + 1]:
            return i
    return len(bands) - 2


def lesion_rows(
    pred: np.ndarray,
    gt: np.ndarray,
    voxel_ml: float,
    overlap: float = 0.0,
    affine: np.ndarray | None = None,
    drawn: Sequence[dict] = (),
) -> tuple[list[dict], dict]:
    """One row per ground-truth lesion, and the volume's counts.

    Rows: lesion (1..n), voxels, volume_ml, covered (fraction predicted), detected, the
    centroid (voxel indices; with `affine`, also in mm) and, where `drawn` holds
    records of the lesions a generator drew (dicts with x_mm, y_mm, z_mm and any other
    fields), the fields of each record whose centre lies in the lesion, prefixed
    "drawn_" (several drawn lesions can merge into one component: joined by ";").
    Counts: lesions, detected, fp_components, lesion_ml, lesion_f1 (NaN for a volume
    with no lesion and no false positive)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred, gt = pred.astype(bool), gt.astype(bool)
    labels, n = ndimage.label(gt, structure=STRUCTURE)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    hit = np.bincount(labels.ravel(), weights=pred.ravel(), minlength=n + 1)
    centroids = ndimage.center_of_mass(gt, labels, range(1, n + 1)) if n else []
    owners: dict[int, list[dict]] = {}
    if drawn and affine is not None:
        inv = np.linalg.inv(affine)
        for rec in drawn:
            ijk = np.rint(inv @ np.array([rec["x_mm"], rec["y_mm"], rec["z_mm"], 1.0]))[:3]
            ijk = ijk.astype(int)
            if all(0 <= ijk[a] < gt.shape[a] for a in range(3)):
                lab = int(labels[tuple(ijk)])
                if lab:
                    owners.setdefault(lab, []).append(rec)
    rows = []
    for i in range(1, n + 1):
        covered = float(hit[i] / sizes[i])
        row = {
            "lesion": i,
            "voxels": int(sizes[i]),
            "volume_ml": float(sizes[i] * voxel_ml),
            "covered": covered,
            "detected": covered > overlap,
            "i": round(float(centroids[i - 1][0]), 1),
            "j": round(float(centroids[i - 1][1]), 1),
            "k": round(float(centroids[i - 1][2]), 1),
        }
        if affine is not None:
            xyz = affine @ np.array([*centroids[i - 1], 1.0])
            row.update(x_mm=round(float(xyz[0]), 1), y_mm=round(float(xyz[1]), 1))
            row["z_mm"] = round(float(xyz[2]), 1)
        for rec in owners.get(i, []):
            for key, v in rec.items():
                if key in ("x_mm", "y_mm", "z_mm", "subject", "dataset"):
                    continue
                name = f"drawn_{key}"
                row[name] = f"{row[name]};{v}" if name in row else v
        rows.append(row)
    plabels, m = ndimage.label(pred, structure=STRUCTURE)
    touching = np.unique(plabels[gt & (plabels > 0)])
    fp = m - len(touching)
    tp = sum(r["detected"] for r in rows)
    fn = n - tp
    denom = 2 * tp + fn + fp
    counts = {
        "lesions": n,
        "lesions_detected": tp,
        "fp_components": int(fp),
        "lesion_ml": float(gt.sum() * voxel_ml),
        "lesion_f1": 2 * tp / denom if denom else math.nan,
    }
    return rows, counts


def lesion_summary(
    records: Sequence[dict],
    rows: Sequence[dict],
    bands: Sequence[float] = BANDS_ML,
    overlap: float = 0.0,
) -> dict:
    """Per data set: pooled lesion-wise detection, and Dice / AUPRC of the volumes by
    their total lesion volume; per lesion-volume band the counts. `records` are the
    per-volume records (with the counts of `lesion_rows`), `rows` every lesion row."""
    labelled = [r for r in records if "lesions" in r]
    tp = sum(r["lesions_detected"] for r in labelled)
    n = sum(r["lesions"] for r in labelled)
    fp = sum(r["fp_components"] for r in labelled)
    denom = 2 * tp + (n - tp) + fp
    out = {
        "rule": OVERLAP_RULE.format(overlap=overlap),
        "bands_ml": [b if math.isfinite(b) else None for b in bands],
        "lesions": n,
        "detected": tp,
        "fp_components": fp,
        "fp_per_volume": fp / len(labelled) if labelled else math.nan,
        "lesion_f1": 2 * tp / denom if denom else math.nan,
        "sensitivity": tp / n if n else math.nan,
        "by_lesion_volume": [],
        "by_volume_load": [],
    }
    for b in range(len(bands) - 1):
        lo, hi = bands[b], bands[b + 1]
        mine = [r for r in rows if band_of(r["volume_ml"], bands) == b]
        det = sum(bool(r["detected"]) for r in mine)
        out["by_lesion_volume"].append(
            {
                "band": band_label(lo, hi),
                "n": len(mine),
                "detected": det,
                "sensitivity": det / len(mine) if mine else math.nan,
            }
        )
        vols = [r for r in labelled if band_of(r["lesion_ml"], bands) == b]

        def mean(key: str, vols: list[dict] = vols) -> float:
            v = [r[key] for r in vols if r.get(key) is not None and not math.isnan(r[key])]
            return float(np.mean(v)) if v else math.nan

        out["by_volume_load"].append(
            {
                "band": band_label(lo, hi),
                "n": len(vols),
                "dice": mean("dice"),
                "auprc": mean("auprc"),
            }
        )
    return out


def merge_runs(summaries: Sequence[dict]) -> dict:
    """Lesion summaries of several runs of one model on one data set: counts summed,
    lesion F1, sensitivity and FP components per volume averaged over the runs."""
    if not summaries:
        raise ValueError("no lesion summaries to merge")

    def avg(key: str) -> float:
        v = [x[key] for x in summaries if x.get(key) is not None and x[key] == x[key]]
        return float(np.mean(v)) if v else math.nan

    out = dict(summaries[0])
    for key in ("lesions", "detected", "fp_components"):
        out[key] = sum(x[key] for x in summaries)
    for key in ("lesion_f1", "sensitivity", "fp_per_volume"):
        out[key] = avg(key)
    out["by_lesion_volume"] = []
    for b, first in enumerate(summaries[0]["by_lesion_volume"]):
        n = sum(x["by_lesion_volume"][b]["n"] for x in summaries)
        det = sum(x["by_lesion_volume"][b]["detected"] for x in summaries)
        out["by_lesion_volume"].append(
            {
                "band": first["band"],
                "n": n,
                "detected": det,
                "sensitivity": det / n if n else math.nan,
            }
        )
    out["runs"] = len(summaries)
    return out


__all__ = ["BANDS_ML", "band_of", "lesion_rows", "lesion_summary", "merge_runs"]
