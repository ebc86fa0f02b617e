"""Comparing models (the paper's Tables 1 and 2 and Figure 3) from evaluation results.

    table = comparison_table(rows)           # rows: model -> the summaries of its runs
    md, csv_text = table.markdown(), table.csv()
    rows = paired_rows(per_subject, reference="MAEDiff")   # evaluation/paired.py
    paired_markdown(rows), paired_csv(rows), resolved_sentence(rows)
    figure_comparison(examples, "figure3.png")

Pure functions on results and arrays: nothing here imports torch or a model.
The table is the one `maediff report` draws (reporting/tables.py: each cell the mean ±
sd (the sample sd, ddof 1) over runs, folds or seeds, of each run's per-volume mean) in the columns of the
paper's tables; this module adds its marks: in every column the best value is bold and
the second best underlined (higher is better for Dice and AUPRC, lower for l1). The
paired rows state each model's difference to a reference with its uncertainty
(evaluation/paired.py) and whether it is resolved.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..evaluation.paired import PairedRow  # noqa: E402
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


# ------------------------------------------------------------------ paired differences


def _signed(v: float) -> str:
    return f"{v:+.2f}" if math.isfinite(v) else "-"


def _p(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "-"


def paired_markdown(rows: Sequence[PairedRow], unit: str = "points") -> str:
    """The rows as a Markdown table: the mean difference and its interval in `unit`
    (each row's `scale`), both p values and the verdict."""
    if not rows:
        return ""
    ref = rows[0].reference
    lines = [
        f"| Model | measure | pairs | model − {ref} ({unit}) | 95 % interval | "
        "Wilcoxon p | paired t p | difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, k = r.diff, r.scale
        lo, hi = d.ci
        ci = f"[{_signed(k * lo)}, {_signed(k * hi)}]" if math.isfinite(lo) else "-"
        lines.append(
            f"| {r.model} | {r.measure} | {d.n} {r.pairs} | {_signed(k * d.mean)} | {ci} | "
            f"{_p(d.p_wilcoxon)} | {_p(d.p_t)} | {r.verdict()} |"
        )
    return "\n".join(lines) + "\n"


PAIRED_CSV_HEAD = (
    "model,reference,dataset,metric,pairs,n,scale,mean_diff,ci_low,ci_high,sd_diff,"
    "p_wilcoxon,p_t,verdict"
)


def paired_csv(rows: Sequence[PairedRow]) -> str:
    """The rows at full precision, differences in shown units (times `scale`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PAIRED_CSV_HEAD.split(","))
    for r in rows:
        d, k = r.diff, r.scale
        nums = [k * d.mean, k * d.ci[0], k * d.ci[1], k * d.sd, d.p_wilcoxon, d.p_t]
        w.writerow(
            [r.model, r.reference, r.dataset, r.metric, r.pairs, d.n, f"{k:g}"]
            + [repr(float(v)) for v in nums]
            + [r.verdict()]
        )
    return buf.getvalue()


def resolved_sentence(rows: Sequence[PairedRow]) -> str:
    """One sentence naming the resolved differences (with their direction) and,
    per model, the measures whose difference is not resolved."""
    if not rows:
        return ""
    ref = rows[0].reference
    resolved = [
        f"{r.model} {r.verdict().split()[-1]} on {r.measure} ({_signed(r.scale * r.diff.mean)})"
        for r in rows
        if r.diff.resolved()
    ]
    open_: dict[str, list[str]] = {}
    for r in rows:
        if not r.diff.resolved():
            open_.setdefault(r.model, []).append(r.measure)
    parts = [
        f"resolved against {ref}: " + ("; ".join(resolved) if resolved else "none"),
        "not resolved: "
        + ("; ".join(f"{m} ({', '.join(v)})" for m, v in open_.items()) if open_ else "none"),
    ]
    return parts[0][0].upper() + parts[0][1:] + "; " + parts[1] + "."


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
    "paired_csv",
    "paired_markdown",
    "resolved_sentence",
]
