"""One evaluation's results into its summary and its files (docs/evaluation.md §4).

    record_results(summary, run, settings)   # summary.datasets from the protocol's run
    write_results(out, summary, run, settings, figures=True)

`run` is what the protocol computed (evaluation/protocol.py: EvaluationRun); this
module only arranges it: the typed summary (summary.py), per-volume and per-lesion
CSVs, the pooled curves, the figures, summary.json and the report page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..evaluation.aggregate import METRICS, exclusions, summarise
from ..evaluation.labelfree import fixed_fpr_summary, scan_auroc
from ..evaluation.lesions import lesion_summary
from ..evaluation.protocol import DatasetRun, EvalSettings, EvaluationRun
from ..names import HEALTHY, shown_name
from .files import write_json, write_subject_csv
from .report import figure_dice_distribution, figure_dice_vs_volume, figure_pr_curves
from .runs import example_figure, write_report
from .summary import (
    SUMMARY_FILE,
    DatasetResult,
    EvaluationSummary,
    Exclusion,
    Figures,
    FixedFpr,
    LabelFreeResult,
    LesionResult,
    MetricStats,
    curve_key,
)

ORACLE_NOTE = (
    "oracle_best_dice chooses the threshold on each test volume itself: an upper bound, "
    "not a result"
)


def record_results(summary: EvaluationSummary, run: EvaluationRun, settings: EvalSettings) -> None:
    """summary.datasets (every unhealthy data set, then the healthy test set) and
    summary.seconds from the protocol's run."""
    for ds, d in run.datasets.items():
        summary.datasets[ds] = dataset_result(ds, d, run, settings)
    if run.healthy is not None:
        scan_scores = {
            ds: [r.get("anomaly_score", float("nan")) for r in d.outcome.records]
            for ds, d in run.datasets.items()
        }
        add_scan_auroc(summary, scan_scores, [r["anomaly_score"] for r in run.healthy])
        summary.datasets[HEALTHY] = DatasetResult(
            n_test=len(run.healthy),
            metrics=metric_stats(run.healthy, ("l1",)),
            excluded=excluded(run.healthy, ("l1",)),
        )
    summary.seconds = run.seconds


def dataset_result(
    ds: str, d: DatasetRun, run: EvaluationRun, settings: EvalSettings
) -> DatasetResult:
    o = d.outcome
    return DatasetResult(
        threshold=o.threshold,
        threshold_source=f"{shown_name(ds)} val ({d.n_val} volumes, pooled Dice {o.val_dice:.4f})",
        n_test=d.n_test,
        metrics=metric_stats(o.records),
        excluded=excluded(o.records),
        lesions=LesionResult.from_json(
            lesion_summary(o.records, o.lesions, overlap=settings.lesion_overlap)
        ),
        seconds=d.seconds,
        note=ORACLE_NOTE,
        label_free=label_free_result(o.records, run.fpr_thresholds, settings, run.fpr_source),
    )


def label_free_result(
    records: Sequence[dict],
    thresholds: dict[str, float] | None,
    settings: EvalSettings,
    source: str | None,
) -> LabelFreeResult:
    """Dice and lesion F1 at the FPR thresholds of one data set (the scan-level AUROC
    is added once the healthy test volumes are scored: add_scan_auroc)."""
    at = fixed_fpr_summary(records, thresholds, settings.fprs) if thresholds else []
    return LabelFreeResult(
        scan_auroc=None,
        n_healthy=0,
        n_unhealthy=len(records),
        thresholds_source=source if thresholds else None,
        at_fpr=tuple(FixedFpr.from_json(a) for a in at),
    )


def add_scan_auroc(
    summary: EvaluationSummary, scan_scores: dict[str, list[float]], healthy: list[float]
) -> None:
    """Scan-level AUROC of each unhealthy test set against the healthy test volumes."""
    for ds, unhealthy in scan_scores.items():
        d = summary.datasets[ds]
        if d.label_free is not None:
            d.label_free = replace(
                d.label_free, scan_auroc=scan_auroc(healthy, unhealthy), n_healthy=len(healthy)
            )


def metric_stats(
    records: Sequence[dict], metrics: Sequence[str] = METRICS
) -> dict[str, MetricStats]:
    return {k: MetricStats(**v) for k, v in summarise(records, metrics).items()}


def excluded(records: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict[str, Exclusion]:
    return {k: Exclusion(**v) for k, v in exclusions(records, metrics).items()}


def write_results(
    out: Path,
    summary: EvaluationSummary,
    run: EvaluationRun,
    settings: EvalSettings,
    figures: bool = True,
) -> None:
    """Every file of OUT: per-volume and per-lesion CSVs, with figures the examples,
    curves and curves.npz (summary.figures names them), then summary.json and the
    report page."""
    write_subject_csvs(out, summary, run)
    if figures and run.datasets:
        summary.figures = write_figures(out, summary.model, run, settings, data_note(summary))
    write_json(summary.to_json(), out / SUMMARY_FILE)
    write_report([summary], out)


def write_subject_csvs(out: Path, summary: EvaluationSummary, run: EvaluationRun) -> None:
    """DATASET_test_subjects.csv and DATASET_test_lesions.csv per data set (model, data
    set, split, fold and threshold on every row), and IXI_test_subjects.csv."""
    for ds, d in run.datasets.items():
        context = {
            "model": summary.model,
            "dataset": ds,
            "split": "test",
            "fold": summary.fold,
            "threshold": d.outcome.threshold,
        }
        write_subject_csv(d.outcome.records, out / f"{ds}_test_subjects.csv", context)
        write_subject_csv(d.outcome.lesions, out / f"{ds}_test_lesions.csv", context)
    if run.healthy is not None:
        context = {
            "model": summary.model,
            "dataset": HEALTHY,
            "split": "test",
            "fold": summary.fold,
        }
        write_subject_csv(run.healthy, out / "IXI_test_subjects.csv", context)


def data_note(summary: EvaluationSummary) -> str | None:
    """ "synthetic brains (maediff synth), not scans of people" for an evaluation on the
    synthetic benchmark (its synthetic.json), else None."""
    data = Path(summary.data_dir) if summary.data_dir else None
    if data is None or not (data / "synthetic.json").is_file():
        return None
    return "synthetic brains (maediff synth), not scans of people"


def write_figures(
    out: Path,
    label: str,
    run: EvaluationRun,
    settings: EvalSettings,
    note: str | None = None,
) -> Figures:
    """Examples per data set (Figure 3 layout, `note` above them), pooled PR curves,
    Dice per volume and Dice against lesion volume; the pooled curve samples in
    curves.npz."""
    examples = [
        example_figure(d.kept, d.outcome.threshold, settings, out / f"examples_{ds}.png", note).name
        for ds, d in run.datasets.items()
        if d.kept
    ]
    curves = {
        f"{label} {ds}": (d.outcome.curve_scores, d.outcome.curve_labels)
        for ds, d in run.datasets.items()
    }
    # curves.npz keys keep the folder names; the figures show the data sets' names
    shown = {f"{label} {shown_name(ds)}": curves[f"{label} {ds}"] for ds in run.datasets}
    dice = {
        f"{label} {shown_name(ds)}": [r.get("dice", float("nan")) for r in d.outcome.records]
        for ds, d in run.datasets.items()
    }
    by_volume = {
        ds: [
            (r["lesion_ml"], r.get("dice", float("nan")))
            for r in d.outcome.records
            if "lesion_ml" in r
        ]
        for ds, d in run.datasets.items()
    }
    result = Figures(
        examples=examples,
        pr_curves=figure_pr_curves(shown, out / "pr_curves.png").name,
        dice=figure_dice_distribution(dice, out / "dice_per_subject.png").name,
        dice_vs_volume=figure_dice_vs_volume(by_volume, label, out / "dice_vs_volume.png").name,
    )
    np.savez_compressed(
        out / "curves.npz",
        **{curve_key(k, "scores"): v[0] for k, v in curves.items()},
        **{curve_key(k, "labels"): v[1] for k, v in curves.items()},
    )
    return result


__all__ = [
    "add_scan_auroc",
    "label_free_result",
    "record_results",
    "write_figures",
    "write_results",
    "write_subject_csvs",
]
