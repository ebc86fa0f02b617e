"""The whole protocol for one data set (docs/evaluation.md §1), streaming over volumes.

    outcome = evaluate_split(val_volumes, test_volumes)      # iterables of VolumeResult
    outcome.threshold, outcome.records, summarise(outcome.records)

Validation volumes are pooled for the threshold search (only their positive-score
voxels are kept, see thresholds.py); test volumes are post-processed, scored and
dropped one at a time, so memory does not grow with the size of the test split.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..outputs import exit_with_parent
from .labelfree import fixed_fpr_metrics
from .lesions import lesion_rows
from .metrics import average_precision, best_dice, dice, roc_auc
from .normative import BandNormaliser
from .postprocess import (
    EROSION_ITERATIONS,
    MEDIAN_SIZE,
    MIN_COMPONENT,
    anomaly_scores,
    remove_small_components,
)
from .thresholds import PooledVoxels, fpr_threshold, greedy_threshold_search


@dataclass
class VolumeResult:
    """One scan, its healthy reconstruction, brain mask and (optional) lesion labels,
    all (X, Y, Z) arrays on the same grid; intensities in [0, 1]."""

    name: str
    image: np.ndarray
    reconstruction: np.ndarray
    brain_mask: np.ndarray
    segmentation: np.ndarray | None = None
    # the grid's voxel -> mm affine (lesion volumes in ml, centroids in mm); None: 1 mm
    # voxels are assumed
    affine: np.ndarray | None = None
    # records of the lesions a generator drew (synthetic benchmark: lesions.csv), each
    # with x_mm, y_mm, z_mm: joined to the lesion that holds its centre
    drawn: list[dict] = field(default_factory=list)

    @property
    def voxel_ml(self) -> float:
        if self.affine is None:
            return 1e-3
        return float(abs(np.linalg.det(np.asarray(self.affine)[:3, :3]))) / 1000.0

    def __post_init__(self) -> None:
        shapes = {
            "image": self.image.shape,
            "reconstruction": self.reconstruction.shape,
            "brain_mask": self.brain_mask.shape,
        }
        if self.segmentation is not None:
            shapes["segmentation"] = self.segmentation.shape
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{self.name}: arrays differ in shape: {shapes}")
        if self.image.ndim != 3:
            raise ValueError(f"{self.name}: volumes must be 3-D, got shape {self.image.shape}")


@dataclass(frozen=True)
class EvalSettings:
    erosion_iterations: int = EROSION_ITERATIONS
    median_size: int = MEDIAN_SIZE
    min_component: int = MIN_COMPONENT  # components of this many voxels or fewer are removed
    search_steps: int = 10
    fprs: tuple[float, ...] = (0.01, 0.05, 0.10)
    top_fraction: float = 0.01  # volume score: mean of the top 1 % brain-voxel scores
    curve_samples: int = 20000  # voxels per test volume kept for pooled PR curves
    seed: int = 0
    lesion_overlap: float = 0.0  # a lesion is detected above this covered fraction
    # normative scoring (normative.py): the residual against healthy residuals of the
    # same intensity; None scores |x - x_rec| (the paper). Recorded in the summary's
    # scoring, not among these settings.
    normaliser: BandNormaliser | None = field(default=None, compare=False)


@dataclass
class EvalOutcome:
    threshold: float
    val_dice: float
    records: list[dict] = field(default_factory=list)
    curve_scores: np.ndarray | None = None
    curve_labels: np.ndarray | None = None
    fpr_thresholds: dict[str, float] = field(default_factory=dict)
    pooled_bytes: int = 0
    lesions: list[dict] = field(default_factory=list)  # one row per ground-truth lesion


def score_volume(v: VolumeResult, s: EvalSettings = EvalSettings()) -> np.ndarray:
    """Post-processed anomaly score map of one volume (steps 1-3)."""
    residual = np.abs(v.image.astype(np.float32) - v.reconstruction.astype(np.float32))
    if s.normaliser is not None:
        residual = s.normaliser.apply(residual, v.image)
    return anomaly_scores(residual, v.brain_mask, s.erosion_iterations, s.median_size)


def reconstruction_errors(v: VolumeResult) -> dict[str, float]:
    """Mean |x - x_rec| over the whole volume (step 8), and over healthy / lesion brain voxels."""
    err = np.abs(v.image.astype(np.float64) - v.reconstruction.astype(np.float64))
    brain = v.brain_mask.astype(bool)
    lesion = v.segmentation.astype(bool) if v.segmentation is not None else np.zeros_like(brain)
    healthy = brain & ~lesion
    return {
        "l1": float(err.mean()),
        "l1_healthy": float(err[healthy].mean()) if healthy.any() else float("nan"),
        "l1_anomalous": float(err[lesion].mean()) if lesion.any() else float("nan"),
    }


def volume_score(scores: np.ndarray, brain_mask: np.ndarray, top_fraction: float) -> float:
    vals = scores[brain_mask.astype(bool)]
    if vals.size == 0:
        return float("nan")
    k = max(1, int(round(top_fraction * vals.size)))
    return float(np.partition(vals, vals.size - k)[-k:].mean())


def test_metrics(
    v: VolumeResult,
    threshold: float,
    s: EvalSettings,
    fpr_thresholds: Mapping[str, float] | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Every per-volume metric for a test volume (steps 1-8), plus a voxel sample for
    curves; with `fpr_thresholds` (key -> threshold set on healthy volumes) also Dice
    and lesion counts at each (labelfree.fixed_fpr_metrics: dice_KEY, ...)."""
    scores = score_volume(v, s)
    rec = {"subject": v.name, **reconstruction_errors(v)}
    rec["anomaly_score"] = volume_score(scores, v.brain_mask, s.top_fraction)
    if v.segmentation is None:
        return rec, np.zeros(0, np.float32), np.zeros(0, bool)
    gt = v.segmentation.astype(bool)
    pred = remove_small_components(scores > threshold, s.min_component)
    oracle, oracle_t = best_dice(scores, gt)
    rec.update(
        dice=dice(pred, gt),
        auprc=average_precision(scores, gt),
        auroc=roc_auc(scores, gt),
        oracle_best_dice=oracle,
        oracle_threshold=oracle_t,
        lesion_voxels=int(gt.sum()),
        predicted_voxels=int(pred.sum()),
    )
    rows, counts = lesion_rows(pred, gt, v.voxel_ml, s.lesion_overlap, v.affine, v.drawn)
    rec.update(counts)
    if fpr_thresholds:
        rec.update(
            fixed_fpr_metrics(
                scores, gt, fpr_thresholds, s.min_component, s.lesion_overlap, v.voxel_ml
            )
        )
    rec["_lesions"] = [{"subject": v.name, **r} for r in rows]
    rng = np.random.default_rng([s.seed, zlib.crc32(v.name.encode())])
    idx = np.flatnonzero(v.brain_mask.astype(bool).ravel() | gt.ravel())
    if idx.size > s.curve_samples:
        idx = rng.choice(idx, s.curve_samples, replace=False)
    return rec, scores.ravel()[idx].astype(np.float32), gt.ravel()[idx]


def _bounded_map(fn: Callable, items: Iterable, n_jobs: int) -> Iterator:
    """Ordered map that keeps at most 2 * n_jobs items in flight (streaming)."""
    if n_jobs <= 1:
        for it in items:
            yield fn(it)
        return
    with ProcessPoolExecutor(n_jobs, initializer=exit_with_parent) as pool:
        pending: list[Future] = []
        for it in items:
            pending.append(pool.submit(fn, it))
            if len(pending) >= 2 * n_jobs:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def _val_scores(
    args: tuple[VolumeResult, EvalSettings],
) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray]:
    v, s = args
    return v.name, score_volume(v, s), v.segmentation, v.brain_mask


@dataclass
class DatasetRun:
    """One unhealthy data set through the protocol: the outcome on its n_test test
    volumes at the threshold of its n_val validation volumes, the first test volumes
    (kept for the example figure) and the seconds it took."""

    n_val: int
    n_test: int
    outcome: EvalOutcome
    kept: list[VolumeResult] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvaluationRun:
    """Every data set of one evaluation through the protocol (pipeline/evaluate.py runs
    it, reporting/results.py records and writes it)."""

    datasets: dict[str, DatasetRun]
    # thresholds at settings.fprs on the healthy validation volumes (None: none) and
    # where they come from ("IXI val fold 0 (44 healthy volumes)")
    fpr_thresholds: dict[str, float] | None
    fpr_source: str
    healthy: list[dict] | None  # records of the healthy test volumes; None: not evaluated
    seconds: float = 0.0


def _test_job(
    args: tuple[VolumeResult, float, EvalSettings, Mapping[str, float]],
) -> tuple[dict, np.ndarray, np.ndarray]:
    return test_metrics(*args)


def evaluate_split(
    val_volumes: Iterable[VolumeResult],
    test_volumes: Iterable[VolumeResult],
    settings: EvalSettings = EvalSettings(),
    healthy_val_volumes: Iterable[VolumeResult] = (),
    n_jobs: int = 1,
    on_test_volume: Callable[[dict], None] | None = None,
    fpr_thresholds: Mapping[str, float] | None = None,
) -> EvalOutcome:
    """Threshold on the pooled unhealthy validation volumes, then metrics per test volume.

    healthy_val_volumes (optional) set thresholds at the false positive rates in
    settings.fprs over their brain voxels (or `fpr_thresholds` gives them, set once for
    several data sets); each test volume is then also scored at them (dice_fpr1, ...),
    the Dice threshold stays the pooled-validation one. `on_test_volume(record)` is called as each test volume
    finishes (progress bars).
    """
    pool = PooledVoxels()
    for name, scores, seg, _ in _bounded_map(
        _val_scores, ((v, settings) for v in val_volumes), n_jobs
    ):
        if seg is None:
            raise ValueError(
                f"validation volume {name} has no segmentation; the threshold search needs lesion labels"
            )
        pool.add(scores, seg)
    if pool.n_volumes == 0:
        raise ValueError("no unhealthy validation volumes: cannot choose a Dice threshold")
    threshold, val_dice = greedy_threshold_search(pool, settings.search_steps)
    outcome = EvalOutcome(threshold=threshold, val_dice=val_dice, pooled_bytes=pool.nbytes)
    del pool

    healthy = [
        sc[m.astype(bool)]
        for _, sc, _, m in _bounded_map(
            _val_scores, ((v, settings) for v in healthy_val_volumes), n_jobs
        )
    ]
    if fpr_thresholds is not None:
        outcome.fpr_thresholds = dict(fpr_thresholds)
    elif healthy:
        pooled = np.concatenate(healthy)
        outcome.fpr_thresholds = {
            f"fpr{int(round(f * 100))}": fpr_threshold(pooled, f) for f in settings.fprs
        }

    cs, cl = [], []
    for rec, sc, lab in _bounded_map(
        _test_job,
        ((v, threshold, settings, outcome.fpr_thresholds) for v in test_volumes),
        n_jobs,
    ):
        outcome.lesions.extend(rec.pop("_lesions", []))
        outcome.records.append(rec)
        cs.append(sc)
        cl.append(lab)
        if on_test_volume is not None:
            on_test_volume(rec)
    outcome.curve_scores = np.concatenate(cs) if cs else np.zeros(0, np.float32)
    outcome.curve_labels = np.concatenate(cl) if cl else np.zeros(0, bool)
    return outcome


def evaluate_healthy(
    volumes: Iterable[VolumeResult],
    settings: EvalSettings = EvalSettings(),
    pool: list[np.ndarray] | None = None,
) -> list[dict]:
    """Reconstruction error of healthy volumes (step 8) and their scan score
    (anomaly_score, for the scan-level AUROC); `pool`, when given, receives each
    volume's brain-voxel scores (thresholds at false-positive rates)."""
    records = []
    for v in volumes:
        scores = score_volume(v, settings)
        if pool is not None:
            pool.append(scores[v.brain_mask.astype(bool)].astype(np.float32))
        rec = {"subject": v.name, **reconstruction_errors(v)}
        rec["anomaly_score"] = volume_score(scores, v.brain_mask, settings.top_fraction)
        records.append(rec)
    return records
