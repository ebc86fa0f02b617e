"""Comparing models (the paper's Tables 1 and 2 and Figure 3) from evaluation results.

    table = comparison_table(rows)           # rows: model -> the summaries of its runs
    md, csv_text = table.markdown(), table.csv()
    tests = paired_tests(per_subject, reference="MAEDiff")
    figure_comparison(examples, "figure3.png")

Pure functions on results and arrays: nothing here imports torch or a model.
The table is the one `maediff report` draws (reporting/tables.py: each cell the mean ±
std over runs, folds or seeds, of each run's per-volume mean) in the columns of the
paper's tables; this module adds its marks: in every column the best value is bold and
the second best underlined (higher is better for Dice and AUPRC, lower for l1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from ..names import shown_name  # noqa: E402
from .summary import EvaluationSummary  # noqa: E402
from .tables import TABLE_COLUMNS, MetricTable, build_table  # noqa: E402

# (data set, metric, header, scale, higher is better): tables.Column
COLUMNS = TABLE_COLUMNS


@dataclass
class ComparisonTable(MetricTable):
    """The metric table with a runs column and the best / second marks."""

    @property
    def models(self) -> list[str]:
        return self.labels

    def ranks(self) -> np.ndarray:
        """(models, columns) rank of each mean in its column: 0 best, 1 second, ... (-1 missing)."""
        values = self.values
        out = np.full(values.shape[:2], -1)
        for j, col in enumerate(self.columns):
            means = values[:, j, 0]
            ok = np.flatnonzero(~np.isnan(means))
            order = ok[np.argsort(-means[ok] if col.higher_is_better else means[ok], kind="stable")]
            out[order, j] = np.arange(order.size)
        return out

    def cell(self, i: int, j: int) -> str:
        return self.text(i, j)

    def markdown(self, runs: str = "column", mark=None) -> str:
        ranks = self.ranks()

        def best_second(i: int, j: int, c: str) -> str:
            return f"**{c}**" if ranks[i, j] == 0 else f"<u>{c}</u>" if ranks[i, j] == 1 else c

        return super().markdown(runs, mark or best_second)

    def csv(self, runs: str = "column") -> str:
        """model, runs, mean and std of every column (4 decimals)."""
        return self.values_csv()


def comparison_table(
    rows: Mapping[str, Sequence[EvaluationSummary | Mapping]],
) -> ComparisonTable:
    """rows: model name -> the summaries (or summary.json dicts) of its runs."""
    t = build_table(rows, COLUMNS)
    return ComparisonTable(t.labels, t.runs, t.columns, t.cells)


# ------------------------------------------------------------------ paired tests


def paired_tests(
    per_subject: Mapping[str, Mapping[str, Mapping[str, float]]],
    reference: str,
    metrics: Sequence[str] = ("dice", "auprc"),
) -> list[dict]:
    """Wilcoxon signed-rank test of each model against `reference` over test subjects.

    per_subject: model -> "DATASET/metric" -> subject -> value (already averaged over
    a model's runs). Only subjects with a finite value for both models are paired.
    Returns rows {model, key, n, median_diff, p} (median of model - reference).
    """
    out = []
    ref = per_subject.get(reference, {})
    for model, table in per_subject.items():
        if model == reference:
            continue
        for key in sorted(set(table) & set(ref)):
            if key.rsplit("/", 1)[-1] not in metrics:
                continue
            common = [s for s in table[key] if s in ref[key]]
            a = np.array([table[key][s] for s in common], dtype=float)
            b = np.array([ref[key][s] for s in common], dtype=float)
            ok = np.isfinite(a) & np.isfinite(b)
            a, b = a[ok], b[ok]
            row = {
                "model": model,
                "key": key,
                "n": int(a.size),
                "median_diff": float("nan"),
                "p": float("nan"),
            }
            if a.size:
                row["median_diff"] = float(np.median(a - b))
            if a.size >= 2 and np.any(a != b):
                row["p"] = float(wilcoxon(a, b).pvalue)
            out.append(row)
    return out


def tests_markdown(rows: Sequence[dict], reference: str) -> str:
    lines = [
        f"| Model | vs {reference}: data set / metric | subjects | median difference (points) | Wilcoxon p |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        p = "-" if math.isnan(r["p"]) else f"{r['p']:.3g}"
        d = "-" if math.isnan(r["median_diff"]) else f"{100 * r['median_diff']:+.2f}"
        ds, _, metric = r["key"].rpartition("/")
        key = f"{shown_name(ds)}/{metric}" if ds else r["key"]
        lines.append(f"| {r['model']} | {key} | {r['n']} | {d} | {p} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ Figure 3


def figure_comparison(examples: Sequence[Mapping], models: Sequence[str], path: str | Path) -> Path:
    """The same slices for every model, as the paper's Figure 3.

    examples: {"title", "image", "segmentation", "models": {name: (reconstruction, anomaly)}}
    with 2-D arrays. Per example two rows: input + each model's reconstruction, then
    ground truth + each model's anomaly map, each map on its own colour scale (0 to its
    99.5th percentile): the models' residuals differ in size by orders of magnitude,
    and each is thresholded on its own scale anyway.
    """
    cols = 1 + len(models)
    fig, axes = plt.subplots(
        2 * len(examples), cols, figsize=(1.6 * cols, 3.3 * len(examples)), squeeze=False
    )
    for e, ex in enumerate(examples):
        top, bottom = axes[2 * e], axes[2 * e + 1]
        top[0].imshow(ex["image"].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        top[0].set_title(ex.get("title", "input"), fontsize=7)
        bottom[0].imshow(ex["segmentation"].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        bottom[0].set_title("ground truth", fontsize=7)
        for k, m in enumerate(models, 1):
            rec, amap = ex["models"].get(m, (None, None))
            if rec is not None:
                top[k].imshow(rec.T, cmap="gray", vmin=0, vmax=1, origin="lower")
                vmax = max(float(np.percentile(amap, 99.5)), 1e-6)
                bottom[k].imshow(amap.T, cmap="inferno", vmin=0, vmax=vmax, origin="lower")
            top[k].set_title(m, fontsize=7)
        for ax in (*top, *bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "COLUMNS",
    "ComparisonTable",
    "comparison_table",
    "figure_comparison",
    "paired_tests",
    "tests_markdown",
]
