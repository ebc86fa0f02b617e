"""Comparing models (the paper's Tables 1 and 2 and Figure 3) from evaluation results.

    table = comparison_table(rows)           # rows: model -> list of summary.json dicts
    md, csv_text = table.markdown(), table.csv()
    tests = paired_tests(per_subject, reference="MAEDiff")
    figure_comparison(examples, "figure3.png")

Pure functions on results and arrays: nothing here imports torch or a model.
Each cell is the mean ± std over runs (folds or seeds) of each run's per-volume mean;
in every column the best value is bold and the second best underlined (higher is
better for Dice and AUPRC, lower for l1).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from ..names import HEALTHY, MS, TUMOUR  # noqa: E402

# (data set, metric, header, scale, higher is better)
COLUMNS = (
    (TUMOUR, "dice", "BraTS21 Dice (%)", 100.0, True),
    (TUMOUR, "auprc", "BraTS21 AUPRC (%)", 100.0, True),
    (MS, "dice", "MSLUB Dice (%)", 100.0, True),
    (MS, "auprc", "MSLUB AUPRC (%)", 100.0, True),
    (HEALTHY, "l1", "IXI l1 (1e-3)", 1000.0, False),
)


@dataclass
class ComparisonTable:
    models: list[str]
    runs: list[int]  # number of runs behind each row
    values: np.ndarray  # (models, columns, 2): mean and std, NaN where missing
    columns: tuple = COLUMNS
    notes: list[str] = field(default_factory=list)

    def ranks(self) -> np.ndarray:
        """(models, columns) rank of each mean in its column: 0 best, 1 second, ... (-1 missing)."""
        out = np.full(self.values.shape[:2], -1)
        for j, col in enumerate(self.columns):
            means = self.values[:, j, 0]
            ok = np.flatnonzero(~np.isnan(means))
            order = ok[np.argsort(-means[ok] if col[4] else means[ok], kind="stable")]
            out[order, j] = np.arange(order.size)
        return out

    def cell(self, i: int, j: int) -> str:
        mean, std = self.values[i, j]
        if math.isnan(mean):
            return "-"
        return f"{mean:.2f} ± {std:.2f}" if self.runs[i] > 1 else f"{mean:.2f}"

    def markdown(self) -> str:
        ranks = self.ranks()
        head = ["Model", "runs"] + [c[2] for c in self.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, m in enumerate(self.models):
            cells = []
            for j in range(len(self.columns)):
                c = self.cell(i, j)
                cells.append(
                    f"**{c}**" if ranks[i, j] == 0 else f"<u>{c}</u>" if ranks[i, j] == 1 else c
                )
            lines.append("| " + " | ".join([m, str(self.runs[i]), *cells]) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(
            ["model", "runs"]
            + [f"{c[0]}_{c[1]}_{s}" for c in self.columns for s in ("mean", "std")]
        )
        for i, m in enumerate(self.models):
            vals = [f"{v * 1:.4f}" if not math.isnan(v) else "" for v in self.values[i].ravel()]
            w.writerow([m, self.runs[i], *vals])
        return buf.getvalue()


def comparison_table(rows: Mapping[str, Sequence[Mapping]]) -> ComparisonTable:
    """rows: model name -> the summary.json dicts of its runs (folds or seeds)."""
    models = list(rows)
    values = np.full((len(models), len(COLUMNS), 2), np.nan)
    for i, m in enumerate(models):
        for j, (ds, metric, _, scale, _) in enumerate(COLUMNS):
            per_run = [
                s["datasets"][ds]["metrics"][metric]["mean"]
                for s in rows[m]
                if ds in s.get("datasets", {}) and metric in s["datasets"][ds].get("metrics", {})
            ]
            if per_run:
                v = np.asarray(per_run, dtype=float) * scale
                values[i, j] = (v.mean(), v.std())
    return ComparisonTable(models, [len(rows[m]) for m in models], values)


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
        lines.append(f"| {r['model']} | {r['key']} | {r['n']} | {d} | {p} |")
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
