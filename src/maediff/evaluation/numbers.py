"""The numbers an evaluation reports, computed from the protocol's run: pure functions,
nothing written (reporting/results.py arranges them into the summary and its files).

    numbers = run_numbers(run, settings)      # run: protocol.EvaluationRun
    numbers.datasets["Brats21"].scan_auroc    # against the healthy test volumes
    numbers.healthy.metrics["l1"]             # {"mean", "std", "n"}

Per unhealthy data set: the mean ± sd over its test volumes of each metric (volumes
where a metric is undefined left out, and counted), the lesion-wise summary, Dice and
lesion F1 at the thresholds of fixed false-positive rates on healthy validation volumes
(evaluation/labelfree.py) and the scan-level AUROC of its test volumes against the
healthy test volumes; for the healthy test set, its l1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .aggregate import METRICS, exclusions, summarise
from .labelfree import fixed_fpr_summary, scan_auroc
from .lesions import lesion_summary
from .protocol import DatasetRun, EvalSettings, EvaluationRun


@dataclass(frozen=True)
class DatasetNumbers:
    """One data set's numbers (the healthy test set's: metrics and excluded only)."""

    metrics: dict[str, dict[str, float]]  # metric -> {"mean", "std", "n"} (aggregate.summarise)
    excluded: dict[str, dict[str, Any]]  # metric -> {"n", "reason"} (aggregate.exclusions)
    lesions: dict | None = None  # lesions.lesion_summary
    at_fpr: tuple[dict[str, Any], ...] = ()  # labelfree.fixed_fpr_summary
    scan_auroc: float | None = None  # None: no healthy test volumes, or no scores
    n_healthy: int = 0  # healthy test volumes the AUROC compares with


@dataclass(frozen=True)
class RunNumbers:
    datasets: dict[str, DatasetNumbers]
    healthy: DatasetNumbers | None  # None: the healthy test set was not evaluated


def scan_scores(records: Sequence[dict]) -> list[float]:
    """Each volume's scan-level anomaly score (NaN where it has none)."""
    return [r.get("anomaly_score", math.nan) for r in records]


def dataset_numbers(
    d: DatasetRun,
    run: EvaluationRun,
    settings: EvalSettings,
) -> DatasetNumbers:
    o = d.outcome
    healthy = None if run.healthy is None else scan_scores(run.healthy)
    return DatasetNumbers(
        metrics=summarise(o.records, METRICS),
        excluded=exclusions(o.records, METRICS),
        lesions=lesion_summary(o.records, o.lesions, overlap=settings.lesion_overlap),
        at_fpr=tuple(
            fixed_fpr_summary(o.records, run.fpr_thresholds, settings.fprs)
            if run.fpr_thresholds
            else ()
        ),
        scan_auroc=None if healthy is None else scan_auroc(healthy, scan_scores(o.records)),
        n_healthy=0 if healthy is None else len(healthy),
    )


def run_numbers(run: EvaluationRun, settings: EvalSettings) -> RunNumbers:
    """Every number of the evaluation (module docstring)."""
    healthy = None
    if run.healthy is not None:
        healthy = DatasetNumbers(
            metrics=summarise(run.healthy, ("l1",)), excluded=exclusions(run.healthy, ("l1",))
        )
    return RunNumbers(
        datasets={ds: dataset_numbers(d, run, settings) for ds, d in run.datasets.items()},
        healthy=healthy,
    )


__all__ = ["DatasetNumbers", "RunNumbers", "dataset_numbers", "run_numbers", "scan_scores"]
