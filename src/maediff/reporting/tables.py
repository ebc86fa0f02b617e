"""One metric table of evaluation summaries, for `maediff report` and `maediff benchmark`.

    table = build_table([("MAEDiff", [s0, s1, s2]), ("Thresh", [t0])], TABLE_COLUMNS)
    table.markdown()                 # | Model | runs | BraTS21 Dice (%) | ...
    table.markdown(runs="label")     # | Model | ... with "MAEDiff (3 runs)"

A row is a name and the summaries of its runs (folds or seeds); a column is a data set
and a metric with its scale. Each cell is the mean ± sd (the sample sd, ddof 1) over the row's
runs of each run's per-volume mean, the std shown where more than one run has the
metric; a cell that fewer runs than the row's have a value for states that count
("(n=2)"). The report draws its columns from the data sets its summaries hold
(`dataset_columns`), the benchmark those of the paper's tables (TABLE_COLUMNS) and adds
its marks (comparison.py). Also the tables of results by lesion (lesion_markdown) and
without lesion labels (labelfree_markdown). Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..evaluation.aggregate import mean_sd
from ..names import ANOMALY_SETS, HEALTHY, MS, TUMOUR, shown_name
from .summary import EvaluationSummary, as_summaries


class Column(NamedTuple):
    dataset: str
    metric: str
    header: str
    scale: float
    higher_is_better: bool = True


# per anomaly set and for the healthy set: (metric, header after the data set, scale, higher is better)
ANOMALY_METRICS = (("dice", "Dice (%)", 100.0, True), ("auprc", "AUPRC (%)", 100.0, True))
HEALTHY_METRICS = (("l1", "l1 (1e-3)", 1000.0, False),)

# The paper's Tables 1 and 2 (the benchmark): fixed columns, the tumour set as BraTS21
TABLE_COLUMNS = (
    Column(TUMOUR, "dice", "BraTS21 Dice (%)", 100.0, True),
    Column(TUMOUR, "auprc", "BraTS21 AUPRC (%)", 100.0, True),
    Column(MS, "dice", "MSLUB Dice (%)", 100.0, True),
    Column(MS, "auprc", "MSLUB AUPRC (%)", 100.0, True),
    Column(HEALTHY, "l1", "IXI l1 (1e-3)", 1000.0, False),
)


def dataset_columns(
    anomaly_sets: Sequence[str], healthy_sets: Sequence[str] = ()
) -> tuple[Column, ...]:
    """Dice and AUPRC of every anomaly set, then l1 of every healthy set."""
    cols = [
        Column(ds, m, f"{shown_name(ds)} {label}", scale, higher)
        for ds in anomaly_sets
        for m, label, scale, higher in ANOMALY_METRICS
    ]
    cols += [
        Column(ds, m, f"{shown_name(ds)} {label}", scale, higher)
        for ds in healthy_sets
        for m, label, scale, higher in HEALTHY_METRICS
    ]
    return tuple(cols)


def datasets_of(summaries: Sequence[EvaluationSummary]) -> tuple[list[str], list[str]]:
    """(anomaly sets, healthy sets) the summaries hold: pDDPM's in their usual order,
    then any other anomaly set (a BIDS data set) in the order met, then IXI."""
    seen: list[str] = []
    for s in summaries:
        seen += [ds for ds in s.datasets if ds not in seen]
    anomaly = [ds for ds in ANOMALY_SETS if ds in seen]
    anomaly += [ds for ds in seen if ds not in anomaly and ds != HEALTHY]
    return anomaly, [HEALTHY] if HEALTHY in seen else []


def mean_std_text(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± sd' of several values (the sample sd, ddof 1: evaluation/aggregate.py
    mean_sd), the value alone for one, '-' for none."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return "-"
    if a.size == 1:
        return f"{a[0]:.{digits}f}"
    mean, sd = mean_sd(a)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


@dataclass(frozen=True)
class Cell:
    """One column of one row: the runs' per-volume means (scaled)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """The sample sd (ddof 1) over the runs; NaN for one run."""
        return mean_sd(self.values)[1]

    @property
    def n(self) -> int:
        return len(self.values)

    def text(self, runs: int, digits: int = 2) -> str:
        t = mean_std_text(self.values, digits)
        return t if self.n == runs else f"{t} (n={self.n})"


@dataclass
class MetricTable:
    labels: list[str]  # row names
    runs: list[int]  # summaries behind each row
    columns: tuple[Column, ...]
    cells: list[list[Cell | None]]  # (rows, columns); None: no run of the row has it

    @property
    def values(self) -> np.ndarray:
        """(rows, columns, 2): mean and std of each cell, NaN where missing."""
        out = np.full((len(self.labels), len(self.columns), 2), np.nan)
        for i, row in enumerate(self.cells):
            for j, c in enumerate(row):
                if c is not None:
                    out[i, j] = (c.mean, c.std)
        return out

    def text(self, i: int, j: int) -> str:
        c = self.cells[i][j]
        return "-" if c is None else c.text(self.runs[i])

    def label(self, i: int, runs: str = "column") -> str:
        n = self.runs[i]
        return f"{self.labels[i]} ({n} runs)" if runs == "label" and n > 1 else self.labels[i]

    def header(self, runs: str = "column") -> list[str]:
        return ["Model", *(["runs"] if runs == "column" else []), *(c.header for c in self.columns)]

    def body(
        self, runs: str = "column", mark: Callable[[int, int, str], str] | None = None
    ) -> list[list[str]]:
        """Rows of cell texts. runs: "column" (a runs column) or "label" (the row name
        says "(N runs)" where N > 1); mark(i, j, text) decorates a cell."""
        if runs not in ("column", "label"):
            raise ValueError(f"runs must be 'column' or 'label', not {runs!r}")
        out = []
        for i in range(len(self.labels)):
            cells = [self.text(i, j) for j in range(len(self.columns))]
            if mark is not None:
                cells = [mark(i, j, t) for j, t in enumerate(cells)]
            out.append(
                [self.label(i, runs), *([str(self.runs[i])] if runs == "column" else []), *cells]
            )
        return out

    def markdown(
        self, runs: str = "column", mark: Callable[[int, int, str], str] | None = None
    ) -> str:
        return markdown_table(self.header(runs), self.body(runs, mark))

    def csv(self, runs: str = "column") -> str:
        """The cells as text (the Markdown table's numbers)."""
        return csv_table(self.header(runs), self.body(runs))

    def values_csv(self) -> str:
        """model, runs, then mean and std of every column (4 decimals, '' where missing)."""
        head = ["model", "runs"] + [
            f"{c.dataset}_{c.metric}_{s}" for c in self.columns for s in ("mean", "std")
        ]
        vals = self.values
        body = [
            [m, self.runs[i], *(f"{v:.4f}" if not math.isnan(v) else "" for v in vals[i].ravel())]
            for i, m in enumerate(self.labels)
        ]
        return csv_table(head, body)


def markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def csv_table(header: Sequence, body: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


def build_table(
    rows: Iterable[tuple[str, Sequence[EvaluationSummary | Mapping]]] | Mapping,
    columns: Sequence[Column],
) -> MetricTable:
    """rows: (name, the summaries of its runs) pairs, or a mapping name -> summaries."""
    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    labels, runs, cells = [], [], []
    for name, group in items:
        group = as_summaries(group)
        line: list[Cell | None] = []
        for col in columns:
            per_run = [m for s in group if (m := s.mean(col.dataset, col.metric)) is not None]
            line.append(
                Cell(tuple((np.asarray(per_run, dtype=float) * col.scale).tolist()))
                if per_run
                else None
            )
        labels.append(name)
        runs.append(len(group))
        cells.append(line)
    return MetricTable(labels, runs, tuple(columns), cells)


def labelfree_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table: per (run, data set) the scan-level AUROC and Dice / lesion F1 at each
    FPR threshold. rows: {run, dataset, scan_auroc, n_healthy, n_unhealthy, at_fpr}
    with at_fpr as fixed_fpr_summary gives it."""
    if not rows:
        return ""
    fprs = sorted({a["fpr"] for r in rows for a in r["at_fpr"]})

    def pct(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    head = ["run", "data set", "scan AUROC (%)", "healthy / unhealthy scans"]
    for f in fprs:
        head += [f"Dice @ {f:.0%} FPR (%)", f"lesion F1 @ {f:.0%} FPR (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        at = {a["fpr"]: a for a in r["at_fpr"]}
        cells = [
            r["run"],
            shown_name(r["dataset"]),
            pct(r["scan_auroc"]),
            f"{r['n_healthy']} / {r['n_unhealthy']}",
        ]
        for f in fprs:
            a = at.get(f)
            dice_mean = a["dice"]["mean"] if a and a["dice"] else None
            cells += [pct(dice_mean), pct(a["lesion_f1"] if a else None)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lesion_markdown(by_model: dict[str, dict[str, dict]]) -> str:
    """model -> data set -> lesion summary: one table of lesion-wise detection."""
    if not by_model:
        return ""
    head = "| model | data set | lesions | lesion F1 (%) | sensitivity (%) | FP comp. / vol | sensitivity by lesion volume |"
    lines = [head, "|---|---|---|---|---|---|---|"]

    def pct(v: float) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    for model, per_ds in by_model.items():
        for ds, s in per_ds.items():
            bands = ", ".join(
                f"{b['band']}: {b['detected']}/{b['n']}" for b in s["by_lesion_volume"] if b["n"]
            )
            fpv = s["fp_per_volume"]
            fpv_text = "-" if fpv is None or math.isnan(fpv) else f"{fpv:.1f}"
            lines.append(
                f"| {model} | {shown_name(ds)} | {s['lesions']} | {pct(s['lesion_f1'])} | "
                f"{pct(s['sensitivity'])} | {fpv_text} | {bands} |"
            )
    return "\n".join(lines) + "\n"


__all__ = [
    "labelfree_markdown",
    "lesion_markdown",
    "ANOMALY_METRICS",
    "HEALTHY_METRICS",
    "TABLE_COLUMNS",
    "Cell",
    "Column",
    "MetricTable",
    "build_table",
    "csv_table",
    "dataset_columns",
    "datasets_of",
    "markdown_table",
    "mean_std_text",
]
