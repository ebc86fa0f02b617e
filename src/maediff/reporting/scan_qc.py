"""A picture per scan to check a map by eye (`maediff detect --qc`), and the page that
lists them, as nnU-Net's, fMRIPrep's and FreeSurfer's QC pages do.

    figure_scan_qc(vol.image, rec, scores, pred, vol.brain_mask, "sub-01", "maps/sub-01_qc.png")
    write_qc_index("maps/", rows)          # maps/index.html: every scan's picture and scores

The figure: three planes (axial, coronal, sagittal) through the highest-scoring region
of the score map, each with the input, the reconstruction, the anomaly score map with
its colour bar, and the binary prediction over the input (the score map's top
percent where there is no threshold). Everything on the model grid, where the model saw
the scan. Pure matplotlib on arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from .report import _save, _show, colour_bar, plt, write_html

PLANES = ("axial", "coronal", "sagittal")
TITLE = "maediff detect: one picture per scan"  # what detect looks for before replacing it


def hottest_point(scores: np.ndarray, brain: np.ndarray) -> tuple[int, int, int]:
    """The voxel at the centre of the highest-scoring region: the maximum of the score
    map smoothed over about 3 voxels, inside the brain (the brain's centre when the map
    is flat)."""
    smooth = ndimage.uniform_filter(scores.astype(np.float32), size=3) * (brain > 0)
    if not smooth.any():
        idx = np.argwhere(brain) if brain.any() else np.argwhere(np.ones_like(brain))
        return tuple(int(v) for v in idx.mean(0).round())  # type: ignore[return-value]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(smooth)), smooth.shape))  # type: ignore[return-value]


def plane(volume: np.ndarray, point: Sequence[int], name: str) -> np.ndarray:
    """The 2-D plane `name` of an (X, Y, Z) volume through `point`."""
    x, y, z = point
    return {"axial": volume[:, :, z], "coronal": volume[:, y, :], "sagittal": volume[x, :, :]}[name]


def figure_scan_qc(
    image: np.ndarray,
    reconstruction: np.ndarray,
    scores: np.ndarray,
    prediction: np.ndarray | None,
    brain: np.ndarray,
    title: str,
    path: str | Path,
) -> Path:
    """The QC picture of one scan (module docstring); arrays (X, Y, Z) on one grid."""
    point = hottest_point(scores, brain)
    inside = scores[brain > 0]
    vmax = float(np.percentile(inside, 99.5)) if inside.size and inside.max() > 0 else 1.0
    if prediction is None:  # no threshold: the top 1 % of the brain's scores
        cut = float(np.percentile(inside, 99)) if inside.size else np.inf
        prediction, what = (scores > cut) & (brain > 0), "top 1 % of scores"
    else:
        what = "prediction"
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.2), squeeze=False)
    for row, name in zip(axes, PLANES):
        img = plane(image, point, name)
        _show(row[0], img, f"{name}: input")
        _show(row[1], plane(reconstruction, point, name), "reconstruction")
        shown = _show(row[2], plane(scores, point, name), "anomaly score", "inferno", vmax=vmax)
        colour_bar(fig, shown, row[2])
        _show(row[3], img, f"{what} over input")
        over = np.ma.masked_where(~plane(prediction, point, name), np.ones_like(img))
        row[3].imshow(np.rot90(over), cmap="autumn", alpha=0.6, interpolation="nearest")
    fig.suptitle(f"{title}\nplanes through voxel {point} (model grid)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def write_qc_index(
    out_dir: str | Path, rows: Sequence[Mapping[str, str]], pictures: Mapping[str, Path]
) -> Path:
    """OUT/index.html: per scan (rows of the scores table, sorted by anomaly score,
    highest first) its scores, flags and picture."""
    out = Path(out_dir)

    def score(r: Mapping[str, str]) -> float:
        try:
            return float(r.get("anomaly_score") or "nan")
        except ValueError:
            return float("nan")

    ordered = sorted(rows, key=lambda r: -score(r) if score(r) == score(r) else np.inf)
    sections = []
    for r in ordered:
        pic = pictures.get(r["scan"])
        if pic is None or not pic.exists():
            continue
        text = (
            f"anomaly score {r.get('anomaly_score', '')}, brain {r.get('brain_ml', '')} ml, "
            f"anomalous {r.get('anomalous_ml') or 'n/a'} ml; "
            f"checks: {r.get('qc') or 'no flag'}"
        )
        sections.append({"heading": r["scan"], "text": text, "images": [pic]})
    return write_html(out / "index.html", TITLE, sections)


__all__ = ["figure_scan_qc", "hottest_point", "write_qc_index"]
