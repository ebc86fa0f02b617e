"""Saved evaluations -> one report: the Table 1 layout (Markdown and CSV), combined
figures and one HTML page.

    summaries = [load_summary("runs/eval-a"), load_summary("runs/eval-b")]
    write_report(summaries, "report/")

This is what `maediff report` runs; like the rest of evaluation/ it imports neither
torch nor a model (tested), so drawing tables of finished evaluations stays light.
Evaluations of one model label on one data folder (folds, seeds) form one row, mean
± sd over runs (the sample sd, ddof 1; the table of reporting/tables.py, which the benchmark draws too);
the data folder is named in the row when the report holds several.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.postprocess import remove_small_components
from ..evaluation.protocol import EvalSettings, VolumeResult, score_volume
from ..names import ANOMALY_SETS, HEALTHY, shown_name
from .files import read_subject_csv, write_atomic
from .report import (
    figure_dice_distribution,
    figure_examples,
    figure_pr_curves,
    write_html,
)
from .summary import DatasetResult, EvaluationSummary, as_summaries, split_curve_key
from .tables import (
    Column,
    MetricTable,
    build_table,
    dataset_columns,
    datasets_of,
    labelfree_markdown,
    lesion_markdown,
)


def load_summary(path: str | Path) -> EvaluationSummary:
    """summary.json of an evaluation (its folder or the file); `folder` records the folder."""
    return EvaluationSummary.read(path)


def example_figure(
    kept: Sequence[VolumeResult],
    threshold: float,
    settings: EvalSettings,
    path: Path,
    note: str | None = None,
) -> Path:
    """Figure 3 layout for a few test volumes, post-processed as in the protocol;
    `note` above it (that the volumes are synthetic, for the synthetic benchmark)."""
    ex = []
    for v in kept:
        scores = score_volume(v, settings)
        pred = remove_small_components(scores > threshold, settings.min_component)
        ex.append(
            {
                "name": v.name,
                "image": v.image,
                "reconstruction": v.reconstruction,
                "scores": scores,
                "segmentation": v.segmentation,
                "prediction": pred,
            }
        )
    return figure_examples(ex, path, note=note)


def _data_key(s: EvaluationSummary) -> str:
    return str(Path(s.data_dir).resolve()) if s.data_dir else ""


def _data_names(summaries: Sequence[EvaluationSummary]) -> dict[str, str]:
    """Resolved data folder -> the name shown: its folder name, or the whole path when
    two folders share a name."""
    keys = sorted({_data_key(s) for s in summaries})
    base = {k: Path(k).name or k for k in keys}
    return {k: base[k] if list(base.values()).count(base[k]) == 1 else k for k in keys}


def _group_labels(summaries: Sequence[EvaluationSummary]) -> list[tuple[str, str]]:
    """(group key, display label) of each summary: the model label, plus the data
    folder when the summaries come from more than one."""
    names = _data_names(summaries)
    several = len(names) > 1
    out = []
    for s in summaries:
        key = _data_key(s)
        label = f"{s.model} — {names[key]}" if several else s.model
        out.append((f"{s.model}\0{key}", label))
    return out


def report_rows(
    summaries: Sequence[EvaluationSummary | Mapping],
) -> list[tuple[str, list[EvaluationSummary]]]:
    """The report's rows: one per (model label, data folder), with the summaries of its
    runs (folds, seeds). Data sets of different folders are never averaged together."""
    summaries = as_summaries(summaries)
    groups: dict[str, tuple[str, list[EvaluationSummary]]] = {}
    for s, (key, label) in zip(summaries, _group_labels(summaries)):
        groups.setdefault(key, (label, []))[1].append(s)
    return list(groups.values())


def report_table(summaries: Sequence[EvaluationSummary | Mapping]) -> MetricTable:
    """The report's table: Dice and AUPRC of every anomaly set the summaries hold, l1 of
    the healthy set; shown with runs="label" ("MAEDiff (3 runs)")."""
    summaries = as_summaries(summaries)
    return build_table(report_rows(summaries), dataset_columns(*datasets_of(summaries)))


def table_rows(summaries: Sequence[EvaluationSummary | Mapping]) -> tuple[list[dict], list[str]]:
    """The report's rows as dicts (callers of 0.4): {"model": row name, DATASET: metric ->
    {"mean", "std", "n"}} over the runs of the row (unscaled, every metric the runs
    share a data set in), and the data sets."""
    summaries = as_summaries(summaries)
    anomaly, healthy = datasets_of(summaries)
    datasets = [*anomaly, *healthy]
    metrics = {
        ds: sorted({m for s in summaries if ds in s.datasets for m in s.datasets[ds].metrics})
        for ds in datasets
    }
    columns = [Column(ds, m, m, 1.0) for ds in datasets for m in metrics[ds]]
    table = build_table(report_rows(summaries), columns)
    rows = []
    for i in range(len(table.labels)):
        row: dict[str, Any] = {"model": table.label(i, runs="label")}
        for col, c in zip(columns, table.cells[i]):
            if c is not None:
                row.setdefault(col.dataset, {})[col.metric] = {
                    "mean": c.mean,
                    "std": c.std,
                    "n": c.n,
                }
        rows.append(row)
    return rows, datasets


def _run_tags(summaries: Sequence[EvaluationSummary]) -> list[str]:
    """A label per summary for figure legends: the row label, numbered when repeated."""
    labels = [label for _, label in _group_labels(summaries)]
    return [
        label if labels.count(label) == 1 else f"{label} #{i}" for i, label in enumerate(labels, 1)
    ]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _t_test_text(scoring) -> str:
    """How t_test was set: the configured value, or the choice made on validation."""
    if scoring is None or scoring.t_test is None:
        return ""
    c = scoring.t_choice
    if not c:
        return f"t_test: {scoring.t_test} (configured)"
    tried = ", ".join(
        f"{t}: {100 * sum(d.values()) / len(d):.2f}" for t, d in c["val_dice"].items()
    )
    return (
        f"t_test: {c['chosen']}, chosen on the validation volumes (mean pooled validation "
        f"Dice, %, per candidate: {tried}; configured {c['configured']})"
    )


def _exclusion_text(d: DatasetResult) -> str:
    ex = d.excluded or {}
    if not ex:
        return ""
    parts = [f"{m} {v.n} ({v.reason})" for m, v in ex.items()]
    return "; left out of the means: " + ", ".join(parts)


def check_combinable(summaries: Sequence[EvaluationSummary]) -> None:
    """The runs a row combines (mean ± std) must be runs of one test: an evaluation
    given twice, or evaluations of one model on test sets of different sizes (another
    --max-volumes), would pass for several runs of one test."""
    seen: dict[Path, int] = {}
    for i, s in enumerate(summaries, 1):
        if s.folder is not None:
            if s.folder in seen:
                raise ValueError(
                    f"evaluation {s.folder} is given twice (arguments {seen[s.folder]} and {i}); "
                    "each run counts once"
                )
            seen[s.folder] = i
    for label, runs in report_rows(summaries):
        first = runs[0]
        for other in runs[1:]:
            for ds, d in other.datasets.items():
                ref = first.datasets.get(ds)
                if ref is not None and ref.n_test != d.n_test:
                    where = lambda s: s.folder or s.model  # noqa: E731
                    raise ValueError(
                        f"{label}: {where(first)} has {ref.n_test} {shown_name(ds)} test "
                        f"volumes and {where(other)} {d.n_test}: runs of different test sets "
                        "are not combined (evaluate them on the same volumes, or report them "
                        "apart)"
                    )


def report_files(summaries: Sequence[EvaluationSummary]) -> list[str]:
    """What write_report may write in its folder (the output rule, outputs.py)."""
    return [
        "results.md",
        "results.csv",
        "lesions.md",
        "labelfree.md",
        "report.html",
        "pr_curves_all.png",
        "dice_per_subject_all.png",
        *(
            f"{i}-{_safe(s.model)}_{name}"
            for i, s in enumerate(summaries, 1)
            for name in (s.figures.names() if s.figures else [])
        ),
    ]


def write_report(summaries: Sequence[EvaluationSummary | Mapping], out_dir: str | Path) -> Path:
    """Table 1 style Markdown + CSV and one HTML page with the figures of each summary.
    Figures of summaries saved elsewhere are copied next to the page; every image is
    referenced relative to the page, so the folder can be moved or served as is."""
    summaries = as_summaries(summaries)
    check_combinable(summaries)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = report_table(summaries)
    md = table.markdown(runs="label")
    write_atomic(out / "results.md", md)
    write_atomic(out / "results.csv", table.csv(runs="label"))
    sections: list[dict[str, Any]] = [
        {
            "heading": "Results",
            "table": md,
            "text": "Dice with the threshold chosen on the pooled unhealthy validation volumes of each data set; AUPRC per volume, averaged; l1 on healthy test volumes, in units of 1e-3. Means over volumes (volumes where a metric is undefined are left out, counted below); with several runs of one model on one data folder, mean ± sd over runs (the sample sd, ddof 1; one run: its mean; the sd over its volumes is in its summary.json).",
        }
    ]
    if len(summaries) > 1:
        sections[0]["images"] = _combined_figures(summaries, out)
    lesion_md = lesion_tables(summaries)
    if lesion_md:
        write_atomic(out / "lesions.md", lesion_md)
        sections.append(
            {
                "heading": "Results by lesion",
                "table": lesion_md.split("\n\n")[0],
                "text": "Lesion-wise detection pooled over the test volumes of each run (first table), and Dice and AUPRC of the test volumes grouped by their total lesion volume (second table); "
                + next(
                    d.lesions.rule
                    for sm in summaries
                    for d in sm.datasets.values()
                    if d.lesions is not None
                )
                + ".",
            }
        )
        # the second table in a section of its own: the page renders one table per section
        sections.append(
            {
                "heading": "Dice and AUPRC by lesion volume",
                "table": lesion_md.split("\n\n", 1)[1].strip(),
            }
        )
    free_md = labelfree_tables(summaries)
    if free_md:
        write_atomic(out / "labelfree.md", free_md)
        sections.append({"heading": "Without lesion labels", "table": free_md, "text": FREE_TEXT})
    for idx, (s, tag) in enumerate(zip(summaries, _run_tags(summaries)), 1):
        src = s.folder or out  # folder holding this summary's figures
        lines = [
            f"config: {s.config or 'none (baseline)'}  checkpoint: {s.checkpoint or 'none'}",
            f"data: {s.data_dir}  fold: {s.fold}",
        ]
        t_line = _t_test_text(s.scoring)
        if t_line:
            lines.append(t_line)
        for ds, d in s.datasets.items():
            if d.has_threshold:
                oracle = d.mean("oracle_best_dice")
                oracle = float("nan") if oracle is None else oracle
                lines.append(
                    f"{shown_name(ds)}: threshold {d.threshold:.4f} from {d.threshold_source}; {d.n_test} test volumes; oracle best Dice (upper bound, not a result) {oracle:.4f}"
                    + _exclusion_text(d)
                )
            else:
                lines.append(f"{shown_name(ds)}: {d.n_test} test volumes" + _exclusion_text(d))
        images = []
        for name in s.figures.names() if s.figures else []:
            if (src / name).exists():
                same = src.resolve() == out.resolve()
                target = out / (name if same else f"{idx}-{_safe(s.model)}_{name}")
                if not same:
                    shutil.copyfile(src / name, target)
                images.append(target)
        sections.append(
            {"heading": f"{tag} (fold {s.fold})", "pre": "\n".join(lines), "images": images}
        )
    return write_html(out / "report.html", "maediff report", sections)


FREE_TEXT = (
    "What a user without lesion labels gets (docs/evaluation.md, Label-free results): the "
    "scan-level AUROC of the scan score (mean of the top 1 % brain-voxel scores) between the "
    "healthy test volumes and the data set's test volumes, and Dice and lesion-wise F1 with "
    "the threshold set at a false-positive rate on the brain voxels of healthy validation "
    "volumes. The Results table keeps the protocol's threshold."
)


def labelfree_tables(
    summaries: Sequence[EvaluationSummary | Mapping], tags: Sequence[str] | None = None
) -> str:
    """Markdown: per run and data set the scan-level AUROC and Dice / lesion F1 at the
    false-positive-rate thresholds ('' when no summary has them). `tags` name the runs
    (default: each summary's model, numbered)."""
    summaries = as_summaries(summaries)
    rows = []
    for s, tag in zip(summaries, tags if tags is not None else _run_tags(summaries)):
        for ds, d in s.datasets.items():
            f = d.label_free
            if f is not None and (f.scan_auroc is not None or f.at_fpr):
                at = [a.to_json() for a in f.at_fpr]
                rows.append(
                    {
                        "run": tag,
                        "dataset": ds,
                        "scan_auroc": f.scan_auroc,
                        "n_healthy": f.n_healthy,
                        "n_unhealthy": f.n_unhealthy,
                        "at_fpr": at,
                    }
                )
    return labelfree_markdown(rows)


def lesion_tables(summaries: Sequence[EvaluationSummary | Mapping]) -> str:
    """Markdown: lesion-wise detection and Dice / AUPRC by lesion load, one row per run
    and data set ('' for summaries written before results by lesion existed)."""
    summaries = as_summaries(summaries)
    by_run: dict[str, dict[str, Any]] = {}
    for s, tag in zip(summaries, _run_tags(summaries)):
        per_ds = {ds: d.lesions for ds, d in s.datasets.items() if d.lesions is not None}
        if per_ds:
            by_run[tag] = per_ds
    if not by_run:
        return ""
    lines = ["", "| run | data set | lesion volume of the scan | volumes | Dice (%) | AUPRC (%) |"]
    lines.append("|---|---|---|---|---|---|")
    for tag, per_ds in by_run.items():
        for ds, d in per_ds.items():
            for b in d.by_volume_load:
                if b.n:
                    dice, auprc = (
                        "-" if v is None or v != v else f"{100 * v:.1f}" for v in (b.dice, b.auprc)
                    )
                    lines.append(
                        f"| {tag} | {shown_name(ds)} | {b.band} | {b.n} | {dice} | {auprc} |"
                    )
    table = {tag: {ds: d.to_json() for ds, d in per_ds.items()} for tag, per_ds in by_run.items()}
    return lesion_markdown(table) + "\n".join(lines) + "\n"


def _combined_figures(summaries: Sequence[EvaluationSummary], out: Path) -> list[Path]:
    """PR curves and per-subject Dice of all summaries in one figure each."""
    curves, dice = combined_series(summaries, out)
    images = []
    complete = {k: v for k, v in curves.items() if v[0] is not None and v[1] is not None}
    if complete:
        images.append(figure_pr_curves(complete, out / "pr_curves_all.png"))
    if dice:
        images.append(figure_dice_distribution(dice, out / "dice_per_subject_all.png"))
    return images


def combined_series(
    summaries: Sequence[EvaluationSummary | Mapping], out: Path
) -> tuple[dict[str, tuple[np.ndarray | None, np.ndarray | None]], dict[str, list[float]]]:
    """The combined figures' series, keyed by their legend labels "RUN DATASET": PR
    curve (scores, labels) and per-subject Dice of every summary and data set."""
    summaries = as_summaries(summaries)
    curves: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    dice: dict[str, list[float]] = {}
    for s, tag in zip(summaries, _run_tags(summaries)):
        src = s.folder or out
        if (src / "curves.npz").exists():
            with np.load(src / "curves.npz") as z:
                for key in z.files:
                    ds, part = split_curve_key(key, s.datasets)
                    label = f"{tag} {shown_name(ds)}"  # as the figure shows it
                    sc, lab = curves.get(label, (None, None))
                    curves[label] = (z[key], lab) if part == "scores" else (sc, z[key])
        for ds in [d for d in s.datasets if d != HEALTHY]:
            f = src / f"{ds}_test_subjects.csv"
            if f.exists():
                rows = read_subject_csv(f, ["dice"])
                dice[f"{tag} {shown_name(ds)}"] = [v["dice"] for _, v in rows]
    return curves, dice


__all__ = [
    "ANOMALY_SETS",
    "example_figure",
    "load_summary",
    "report_rows",
    "report_table",
    "table_rows",
    "write_report",
]
