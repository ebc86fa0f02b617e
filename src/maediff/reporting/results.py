"""One evaluation's results into its summary and its files (docs/evaluation.md §4).

    record_results(summary, run, numbers)    # numbers: evaluation/numbers.py run_numbers
    write_results(out, summary, run, settings, figures=True)

`run` is what the protocol computed (evaluation/protocol.py: EvaluationRun) and
`numbers` every number reported of it (evaluation/numbers.py); this module only
arranges them: the typed summary (summary.py), per-volume and per-lesion
CSVs, the pooled curves, the figures, summary.json and the report page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluation.numbers import DatasetNumbers, RunNumbers
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


def record_results(summary: EvaluationSummary, run: EvaluationRun, numbers: RunNumbers) -> None:
    """summary.datasets (every unhealthy data set, then the healthy test set) and
    summary.seconds: the protocol's run and the numbers computed from it
    (evaluation/numbers.py), arranged."""
    for ds, d in run.datasets.items():
        summary.datasets[ds] = dataset_result(ds, d, numbers.datasets[ds], run)
    if run.healthy is not None and numbers.healthy is not None:
        summary.datasets[HEALTHY] = DatasetResult(
            n_test=len(run.healthy),
            metrics=metric_stats(numbers.healthy),
            excluded=excluded(numbers.healthy),
        )
    summary.seconds = run.seconds


def dataset_result(ds: str, d: DatasetRun, n: DatasetNumbers, run: EvaluationRun) -> DatasetResult:
    o = d.outcome
    return DatasetResult(
        threshold=o.threshold,
        threshold_source=f"{shown_name(ds)} val ({d.n_val} volumes, pooled Dice {o.val_dice:.4f})",
        n_test=d.n_test,
        metrics=metric_stats(n),
        excluded=excluded(n),
        lesions=LesionResult.from_json(n.lesions),
        seconds=d.seconds,
        note=ORACLE_NOTE,
        label_free=LabelFreeResult(
            scan_auroc=n.scan_auroc,
            n_healthy=n.n_healthy,
            n_unhealthy=len(o.records),
            thresholds_source=run.fpr_source if run.fpr_thresholds else None,
            at_fpr=tuple(FixedFpr.from_json(a) for a in n.at_fpr),
        ),
    )


def metric_stats(n: DatasetNumbers) -> dict[str, MetricStats]:
    return {k: MetricStats(**v) for k, v in n.metrics.items()}


def excluded(n: DatasetNumbers) -> dict[str, Exclusion]:
    return {k: Exclusion(**v) for k, v in n.excluded.items()}


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
    "record_results",
    "write_figures",
    "write_results",
    "write_subject_csvs",
]
