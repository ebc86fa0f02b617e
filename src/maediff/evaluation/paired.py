"""Paired comparisons of two rows over the same test subjects, and the number of
subjects such a comparison needs: pure functions on arrays.

    diff = paired_difference(a, b)            # a, b: (subjects,) or (seeds, subjects)
    diff.mean, diff.ci, diff.p_wilcoxon, diff.p_t
    n = subjects_needed(sd_diff=0.08, delta=0.03)

A row evaluated with several seeds gives each subject one value per seed; the paired
comparison first averages a subject's values over the row's seeds (the subject is the
unit of replication: seeds vary the model, subjects the data), then takes the
per-subject differences a - b. The 95 % interval of their mean is a percentile bootstrap
over subjects (10,000 resamples, seeded: the same inputs give the same interval); the p
values are the Wilcoxon signed-rank test's (what the paper's field reports) and the
paired t-test's. `subjects_needed` sizes a test set: the smallest number of subjects
for which a two-sided paired t-test at level `alpha` detects a true mean difference
`delta` with probability `power`, given the standard deviation of the per-subject
differences (the noncentral t distribution, exact for normal differences).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..names import shown_name


@dataclass(frozen=True)
class PairedDifference:
    """a - b over subjects: the mean, its 95 % bootstrap interval, the two tests' p."""

    n: int
    mean: float
    sd: float  # of the per-subject differences (ddof 1)
    ci: tuple[float, float]
    p_wilcoxon: float
    p_t: float

    def resolved(self, alpha: float = 0.05) -> bool:
        """Whether the difference is resolved: the interval excludes 0 and p < alpha."""
        lo, hi = self.ci
        return (lo > 0 or hi < 0) and self.p_wilcoxon < alpha


def per_subject(values: np.ndarray) -> np.ndarray:
    """(subjects,) or (seeds, subjects) -> (subjects,): the mean over seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        return v
    if v.ndim != 2:
        raise ValueError(f"expected (subjects,) or (seeds, subjects), got shape {v.shape}")
    return v.mean(axis=0)


def bootstrap_ci(
    d: np.ndarray, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `d` over resampled subjects."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> PairedDifference:
    """Row a against row b on the same subjects (same order); NaN subjects are dropped."""
    a, b = per_subject(a), per_subject(b)
    if a.shape != b.shape:
        raise ValueError(f"the two rows hold different subjects: {a.shape} against {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    n = int(d.size)
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    p_w = p_t = math.nan
    if n >= 2 and np.any(d != 0):
        p_w = float(stats.wilcoxon(d).pvalue)
        p_t = float(stats.ttest_1samp(d, 0.0).pvalue) if sd > 0 else 0.0
    return PairedDifference(n, mean, sd, bootstrap_ci(d, seed=seed), p_w, p_t)


def power_paired_t(n: int, sd_diff: float, delta: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n subjects to detect a mean difference
    `delta` when the per-subject differences have standard deviation `sd_diff`."""
    if n < 2:
        return 0.0
    df = n - 1
    nc = delta / sd_diff * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper, lower = stats.nct.sf(crit, df, nc), stats.nct.cdf(-crit, df, nc)
    # scipy's far tail of the noncentral t can come back NaN where it is ~0 (nc >> crit)
    upper = upper if math.isfinite(upper) else float(nc > 0)
    lower = lower if math.isfinite(lower) else float(nc < 0)
    return float(min(1.0, upper + lower))


def subjects_needed(
    sd_diff: float, delta: float, alpha: float = 0.05, power: float = 0.8, limit: int = 10_000
) -> int:
    """The smallest n whose paired t-test reaches `power` (see the module's docstring)."""
    if not (sd_diff > 0 and delta > 0):
        raise ValueError(f"sd_diff and delta must be positive, got {sd_diff} and {delta}")
    for n in range(2, limit + 1):
        if power_paired_t(n, sd_diff, delta, alpha) >= power:
            return n
    raise ValueError(f"more than {limit} subjects needed (sd {sd_diff}, delta {delta})")


# ------------------------------------------------------------------ rows of a comparison


@dataclass(frozen=True)
class PairedRow:
    """One model against the reference on one measure: `diff` is model - reference over
    the paired units (`pairs`: "subjects", "probe slices" or "runs"), in stored units;
    `scale` turns them into the units shown (100: percentage points)."""

    model: str
    reference: str
    dataset: str  # as stored ("Brats21"), or "probe"
    metric: str  # "dice", "auprc", "l1"
    pairs: str
    diff: PairedDifference
    scale: float = 100.0

    @property
    def measure(self) -> str:
        """The data set as shown and the metric: "BraTS21 Dice"."""
        name = METRIC_NAMES.get(self.metric, self.metric)
        return f"{shown_name(self.dataset)} {name}" if self.dataset != "probe" else name

    def verdict(self, alpha: float = 0.05) -> str:
        """The word: "resolved: higher" / "resolved: lower" (the model's value against the
        reference's), or "not resolved" (`PairedDifference.resolved`)."""
        if not self.diff.resolved(alpha):
            return "not resolved"
        return "resolved: higher" if self.diff.mean > 0 else "resolved: lower"


METRIC_NAMES = {"dice": "Dice", "auprc": "AUPRC", "l1": "in-patch l1"}


def paired_rows(
    per_subject: Mapping[str, Mapping[str, Mapping[str, float]]],
    reference: str,
    metrics: Sequence[str] = ("dice", "auprc"),
) -> list[PairedRow]:
    """Each model against `reference` over the test subjects both have
    (evaluation/paired.py: the mean difference, its 95 % bootstrap interval, the
    Wilcoxon and paired t p).

    per_subject: model -> "DATASET/metric" -> subject -> value (already averaged over a
    model's runs). Subjects with a non-finite value for either model are left out.
    Rows follow the models' order, then data set, then `metrics`' order.
    """
    out = []
    ref = per_subject.get(reference, {})
    for model, table in per_subject.items():
        if model == reference:
            continue
        keys = [k for k in set(table) & set(ref) if k.rsplit("/", 1)[-1] in metrics]
        keys.sort(key=lambda k: (k.rsplit("/", 1)[0], metrics.index(k.rsplit("/", 1)[1])))
        for key in keys:
            ds, metric = key.rsplit("/", 1)
            common = [s for s in table[key] if s in ref[key]]
            a = np.array([table[key][s] for s in common], dtype=float)
            b = np.array([ref[key][s] for s in common], dtype=float)
            out.append(PairedRow(model, reference, ds, metric, "subjects", paired_difference(a, b)))
    return out


__all__ = [
    "METRIC_NAMES",
    "PairedDifference",
    "PairedRow",
    "bootstrap_ci",
    "paired_difference",
    "paired_rows",
    "per_subject",
    "power_paired_t",
    "subjects_needed",
]
