"""Thresholds set on healthy scans alone (docs/labelfree.md), as pure functions on arrays.

    scans = [HealthyScan(name, score_map, brain_mask, voxel_ml), ...]   # post-processed maps
    cal = calibrate(scans, fprs=(0.01, 0.05), identity=..., scoring=...)
    cal.threshold(0.01), cal.to_json(), Calibration.read("calib/")

The threshold at a false-positive rate `fpr` is the (1 - fpr) quantile of the pooled
brain-voxel scores of the healthy scans (thresholds.fpr_threshold): a fraction `fpr` of
healthy brain voxels score above it, before the small components are removed. What the
calibration scans show after that removal is stored beside it (the voxel rate that
remains, and the share of scans with at least one predicted component), so the user
can state what the threshold means on healthy scans.

The uncertainty is a bootstrap over scans (scans, not voxels, are the independent
units): `n_boot` resamples of the scans with replacement, each giving a pooled
quantile; the interval is their 2.5th and 97.5th percentile. The pooled quantile of a
resample is read from per-scan histograms over fine bins in the upper tail, so a
resample costs a matrix product, not a sort of every voxel.

Below MIN_SCANS scans the calibration carries a warning: with fewer resampling units
a bootstrap percentile interval is itself unreliable, and one unusual scan moves the
threshold. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .lesions import STRUCTURE
from .postprocess import remove_small_components
from .protocol import volume_score
from .thresholds import fpr_threshold

CALIBRATION_FILE = "calibration.json"
FORMAT = "maediff-calibration-v1"
MIN_SCANS = 20  # below: a warning (module docstring)
N_BOOT = 1000
TAIL_BINS = 4096
TOP_FRACTION = 0.01  # scan score: mean of the top 1 % brain-voxel scores (EvalSettings)


@dataclass
class HealthyScan:
    """One healthy scan's post-processed score map and brain mask, (X, Y, Z) on the
    model's grid, and the volume of one voxel in ml."""

    name: str
    scores: np.ndarray
    brain_mask: np.ndarray
    voxel_ml: float = 1e-3


@dataclass(frozen=True)
class FprThreshold:
    """The threshold at one false-positive rate and what it does on the calibration scans."""

    fpr: float
    threshold: float
    ci_low: float | None  # 95 % bootstrap interval over scans (None: a single scan)
    ci_high: float | None
    voxel_fpr_after_components: float  # brain voxels still predicted after step 6
    scans_flagged: int  # calibration scans with at least one predicted component


_FIELDS = tuple(FprThreshold.__dataclass_fields__)  # keys a newer version may add are ignored


@dataclass
class Calibration:
    """calibration.json: thresholds at false-positive rates on healthy scans, the scans
    used, and the model (weights and config hashes, scoring settings) they hold for."""

    thresholds: list[FprThreshold]
    scans: list[str]
    scan_scores: list[float]  # each scan's anomaly score, in `scans` order
    n_voxels: int
    model: dict[str, Any]  # identity: name, model, weights_sha256, config_sha256
    scoring: dict[str, Any]  # the settings that change the maps (they must match at use)
    postprocess: dict[str, int]  # erosion_iterations, median_size, min_component
    n_boot: int = N_BOOT
    source: str = ""  # what the scans were (a folder, a CSV, a BIDS selection)
    warnings: list[str] = field(default_factory=list)
    version: str = ""  # the maediff version that wrote it

    @property
    def n_scans(self) -> int:
        return len(self.scans)

    def entry(self, fpr: float) -> FprThreshold:
        for t in self.thresholds:
            if math.isclose(t.fpr, fpr, rel_tol=1e-9):
                return t
        have = ", ".join(f"{t.fpr:g}" for t in self.thresholds)
        raise ValueError(f"the calibration has no threshold at FPR {fpr:g} (it has {have})")

    def threshold(self, fpr: float) -> float:
        return self.entry(fpr).threshold

    def describe(self, fpr: float) -> str:
        """How the threshold was set, in one line (reports, sidecars, scores tables)."""
        t = self.entry(fpr)
        ci = (
            f", 95 % bootstrap interval over scans {t.ci_low:.4g}-{t.ci_high:.4g}"
            if t.ci_low is not None
            else ""
        )
        return (
            f"{t.threshold:.4g}: {t.fpr:.0%} of brain voxels of {self.n_scans} healthy scans "
            f"({self.source or 'calibration'}) score above it{ci}; after small components are "
            f"removed {t.voxel_fpr_after_components:.2%} of their brain voxels and "
            f"{t.scans_flagged} of {self.n_scans} scans have a predicted component"
        )

    def control_percentile(self, score: float) -> float:
        """Percentage of the calibration scans whose anomaly score is below `score`."""
        if not self.scan_scores or not math.isfinite(score):
            return math.nan
        below = sum(s < score for s in self.scan_scores)
        return 100.0 * below / len(self.scan_scores)

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, **asdict(self)}
        out["n_scans"] = self.n_scans
        return out

    @classmethod
    def from_json(cls, d: Any, source: str = "calibration") -> Calibration:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(
                f"{source} is not a maediff calibration (format {got!r}, expected {FORMAT!r})"
            )
        try:
            cal = cls(
                thresholds=[FprThreshold(**{k: t[k] for k in _FIELDS}) for t in d["thresholds"]],
                scans=list(d["scans"]),
                scan_scores=[float(s) for s in d["scan_scores"]],
                n_voxels=int(d["n_voxels"]),
                model=dict(d["model"]),
                scoring=dict(d["scoring"]),
                postprocess=dict(d["postprocess"]),
                n_boot=int(d.get("n_boot", N_BOOT)),
                source=str(d.get("source", "")),
                warnings=list(d.get("warnings", [])),
                version=str(d.get("version", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source} is not a valid calibration: {e!r}") from e
        for t in cal.thresholds:  # a hand edit ("high", NaN) is named here, not at use
            for key in ("fpr", "threshold"):
                v = getattr(t, key)
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise ValueError(
                        f"{source}: the {key} of a threshold is {v!r}, not a finite number"
                    )
            if not 0 < t.fpr < 1:
                raise ValueError(f"{source}: false-positive rate {t.fpr!r} is not in (0, 1)")
        return cal

    @classmethod
    def read(cls, path: str | Path) -> Calibration:
        """calibration.json, or the folder `maediff calibrate` wrote it to."""
        p = Path(path)
        f = p / CALIBRATION_FILE if p.is_dir() else p
        if not f.is_file():
            raise ValueError(f"{p} holds no {CALIBRATION_FILE} (run `maediff calibrate` first)")
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f} is not valid JSON: {e}") from e
        return cls.from_json(data, str(f))


# ------------------------------------------------------------------ the bootstrap


def tail_histograms(
    per_scan: Sequence[np.ndarray], lowest_level: float, bins: int = TAIL_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-scan counts in fine bins over the pooled upper tail.

    Bin edges are pooled quantiles from `lowest_level` to 1 (fine where the thresholds
    lie). Returns (edges (bins + 1,), counts (n_scans, bins), below (n_scans,)): the
    voxels in each bin and the voxels under the first edge."""
    pooled = np.concatenate(per_scan)
    edges = np.quantile(pooled, np.linspace(lowest_level, 1.0, bins + 1))
    edges = np.maximum.accumulate(edges)
    counts = np.zeros((len(per_scan), bins), np.float64)
    below = np.zeros(len(per_scan), np.float64)
    for i, s in enumerate(per_scan):
        idx = np.searchsorted(edges, s, side="right") - 1  # bin i: edges[i] <= s < edges[i+1]
        below[i] = np.count_nonzero(idx < 0)
        idx = np.clip(idx[idx >= 0], 0, bins - 1)  # the maximum goes to the last bin
        counts[i] = np.bincount(idx, minlength=bins)
    return edges, counts, below


def weighted_tail_quantile(
    edges: np.ndarray, counts: np.ndarray, total: float, fpr: float
) -> float:
    """The value above which a fraction `fpr` of `total` voxels lie, from the summed
    tail counts (bins,): linear within the bin where the count from the top crosses."""
    above = np.cumsum(counts[::-1])[::-1]  # voxels in bin j or higher
    target = fpr * total
    j = int(np.searchsorted(-above, -target, side="left"))  # first bin with above <= target
    j = max(j - 1, 0)  # the bin where the crossing happens
    in_bin = counts[j]
    higher = above[j] - in_bin
    frac = 0.0 if in_bin <= 0 else float(np.clip((target - higher) / in_bin, 0.0, 1.0))
    return float(edges[j + 1] - frac * (edges[j + 1] - edges[j]))


def bootstrap_thresholds(
    per_scan: Sequence[np.ndarray], fprs: Sequence[float], n_boot: int = N_BOOT, seed: int = 0
) -> dict[float, np.ndarray]:
    """Pooled (1 - fpr) quantiles of `n_boot` resamples of the scans (with replacement):
    fpr -> (n_boot,) thresholds."""
    lowest = max(0.0, 1.0 - 4.0 * max(fprs))  # resamples' quantiles stay above it
    edges, counts, below = tail_histograms(per_scan, lowest)
    rng = np.random.default_rng(seed)
    n = len(per_scan)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, n)
    tails = weights @ counts  # (B, bins)
    totals = weights @ (counts.sum(1) + below)  # (B,)
    return {
        f: np.array([weighted_tail_quantile(edges, tails[b], totals[b], f) for b in range(n_boot)])
        for f in fprs
    }


# ------------------------------------------------------------------ calibrating


def what_remains(
    scans: Sequence[HealthyScan], threshold: float, min_component: int
) -> tuple[float, int]:
    """(brain-voxel rate still predicted after small components are removed, scans with
    at least one predicted component) at `threshold` on the calibration scans."""
    kept, brain, flagged = 0, 0, 0
    for s in scans:
        pred = remove_small_components(s.scores > threshold, min_component)
        b = s.brain_mask.astype(bool)
        kept += int(np.count_nonzero(pred & b))
        brain += int(np.count_nonzero(b))
        flagged += int(pred.any())
    return (kept / brain if brain else math.nan), flagged


def calibrate(
    scans: Sequence[HealthyScan],
    fprs: Sequence[float],
    model: dict[str, Any],
    scoring: dict[str, Any],
    postprocess: dict[str, int],
    n_boot: int = N_BOOT,
    seed: int = 0,
    source: str = "",
    version: str = "",
) -> Calibration:
    """Thresholds at `fprs` on the pooled brain voxels of healthy `scans` (module docstring)."""
    if not scans:
        raise ValueError("no healthy scans to calibrate on")
    for f in fprs:
        if not 0 < f < 1:
            raise ValueError(f"false-positive rate {f} must be in (0, 1)")
    per_scan = [s.scores[s.brain_mask.astype(bool)].astype(np.float32) for s in scans]
    empty = [s.name for s, v in zip(scans, per_scan) if v.size == 0]
    if empty:
        raise ValueError(f"healthy scan(s) without brain voxels: {', '.join(empty[:5])}")
    pooled = np.concatenate(per_scan)
    boot = bootstrap_thresholds(per_scan, fprs, n_boot, seed) if len(scans) > 1 else {}
    entries = []
    for f in sorted(fprs):
        t = fpr_threshold(pooled, f)
        rate, flagged = what_remains(scans, t, postprocess["min_component"])
        lo, hi = (
            (float(np.percentile(boot[f], 2.5)), float(np.percentile(boot[f], 97.5)))
            if f in boot
            else (None, None)
        )
        entries.append(FprThreshold(f, t, lo, hi, rate, flagged))
    return Calibration(
        thresholds=entries,
        scans=[s.name for s in scans],
        scan_scores=[volume_score(s.scores, s.brain_mask, TOP_FRACTION) for s in scans],
        n_voxels=int(pooled.size),
        model=model,
        scoring=scoring,
        postprocess=dict(postprocess),
        n_boot=n_boot if boot else 0,
        source=source,
        warnings=few_scans_warning(len(scans)),
        version=version,
    )


def few_scans_warning(n: int) -> list[str]:
    if n >= MIN_SCANS:
        return []
    return [
        f"only {n} healthy scan(s): below {MIN_SCANS} the bootstrap interval over scans is "
        "itself unreliable and one unusual scan moves the threshold; calibrate on more "
        "healthy scans from the same scanner and protocol"
    ]


# ------------------------------------------------------------------ scores of one scan


def scan_scores(
    scores: np.ndarray,
    brain_mask: np.ndarray,
    voxel_ml: float,
    threshold: float | None = None,
    min_component: int = 7,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Scalar anomaly scores of one scan from its post-processed score map (X, Y, Z):

    - anomaly_score: mean of the top 1 % brain-voxel scores (the evaluation's scan score);
    - score_p99: the 99th percentile of the brain-voxel scores;
    - brain_ml: brain volume;
    - with a threshold: anomalous_ml and components, the volume and number of predicted
      components after small components are removed (the binary map `detect` writes);
    - with a calibration: control_percentile, the percentage of its healthy scans whose
      anomaly score is lower."""
    brain = brain_mask.astype(bool)
    vals = scores[brain]
    out: dict[str, Any] = {
        "anomaly_score": volume_score(scores, brain_mask, TOP_FRACTION),
        "score_p99": float(np.percentile(vals, 99)) if vals.size else math.nan,
        "brain_ml": float(brain.sum() * voxel_ml),
    }
    if threshold is not None:
        from scipy import ndimage

        pred = remove_small_components(scores > threshold, min_component)
        out["anomalous_ml"] = float(pred.sum() * voxel_ml)
        out["components"] = int(ndimage.label(pred, structure=STRUCTURE)[1])
    if calibration is not None:
        out["control_percentile"] = calibration.control_percentile(out["anomaly_score"])
    return out


__all__ = [
    "CALIBRATION_FILE",
    "MIN_SCANS",
    "Calibration",
    "FprThreshold",
    "HealthyScan",
    "bootstrap_thresholds",
    "calibrate",
    "scan_scores",
    "what_remains",
]
