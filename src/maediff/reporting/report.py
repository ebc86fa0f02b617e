"""The report a person opens after a run: Table-1-style tables (Markdown and CSV),
Figure-3-style examples, precision-recall curves, per-subject Dice distributions,
gathered in one HTML page. Pure matplotlib on arrays; nothing here imports the model.
"""

from __future__ import annotations

import html
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..evaluation.metrics import precision_recall_curve  # noqa: E402
from ..names import shown_name  # noqa: E402
from .files import write_atomic  # noqa: E402
from .tables import (  # noqa: E402
    ANOMALY_METRICS,
    HEALTHY_METRICS,
)

ANOMALY_COLUMNS = tuple(m[:3] for m in ANOMALY_METRICS)  # (metric, header, scale)
HEALTHY_COLUMNS = tuple(m[:3] for m in HEALTHY_METRICS)


def pick_slices(segmentation: np.ndarray | None, scores: np.ndarray, n: int = 3) -> list[int]:
    """Axial slices (last axis) worth showing: the largest lesion areas, else the highest scores."""
    if segmentation is not None and segmentation.any():
        area = segmentation.reshape(-1, segmentation.shape[-1]).sum(0)
    else:
        area = scores.reshape(-1, scores.shape[-1]).sum(0)
    order = np.argsort(-area, kind="stable")
    picked: list[int] = []
    for z in order:  # spread the picks: at least 3 slices apart
        if all(abs(int(z) - p) >= 3 for p in picked):
            picked.append(int(z))
        if len(picked) == n:
            break
    return sorted(picked)


def _show(ax, img, title, cmap="gray", vmin=0.0, vmax=1.0):
    shown = ax.imshow(np.rot90(img), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return shown


def colour_bar(fig, shown, ax) -> None:
    """A colour bar beside a map: what its colours are worth."""
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=6)


def figure_examples(
    examples: Sequence[Mapping],
    path: str | Path,
    slices_per_volume: int = 2,
    note: str | None = None,
) -> Path:
    """Figure 3 style: per row one slice; columns input, reconstruction, anomaly map
    (with its colour bar), ground truth, thresholded prediction. Example keys: name,
    image, reconstruction, scores, segmentation (or None), prediction (or None).
    `note`: a line above the figure (e.g. that the scans are synthetic)."""
    rows = []
    for ex in examples:
        for z in pick_slices(ex.get("segmentation"), ex["scores"], slices_per_volume):
            rows.append((ex, z))
    if not rows:
        raise ValueError("no examples to draw")
    smax = max(
        float(np.percentile(ex["scores"][ex["scores"] > 0], 99.5))
        if (ex["scores"] > 0).any()
        else 1.0
        for ex in examples
    )
    fig, axes = plt.subplots(len(rows), 5, figsize=(10, 2.1 * len(rows)), squeeze=False)
    for i, (ex, z) in enumerate(rows):
        a = axes[i]
        _show(a[0], ex["image"][..., z], f"{ex['name']} z={z}\ninput")
        _show(a[1], ex["reconstruction"][..., z], "reconstruction")
        shown = _show(a[2], ex["scores"][..., z], "anomaly map", cmap="inferno", vmax=smax)
        colour_bar(fig, shown, a[2])
        seg = ex.get("segmentation")
        _show(
            a[3],
            seg[..., z] if seg is not None else np.zeros_like(ex["image"][..., z]),
            "ground truth",
        )
        pred = ex.get("prediction")
        _show(
            a[4],
            pred[..., z] if pred is not None else np.zeros_like(ex["image"][..., z]),
            "prediction",
        )
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def figure_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Pooled precision-recall curves, one per label (e.g. "MAEDiff BraTS21")."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for label, (scores, labels) in curves.items():
        if labels.any():
            p, r, _ = precision_recall_curve(scores, labels)
            ax.plot(np.r_[0.0, r], np.r_[1.0, p], label=label, lw=1.2)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Precision-recall (sampled voxels of the test volumes)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def figure_dice_distribution(
    dice_by_label: Mapping[str, Sequence[float]], path: str | Path
) -> Path:
    """Per-subject Dice as box plots with the points on top."""
    labels = list(dice_by_label)
    data = [[d for d in dice_by_label[k] if not math.isnan(d)] for k in labels]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 3.6))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, fontsize=8)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, 1):
        ax.scatter(i + 0.08 * rng.standard_normal(len(d)), d, s=6, alpha=0.6)
    ax.set_ylabel("Dice per subject")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def figure_dice_vs_volume(
    points: Mapping[str, Sequence[tuple[float, float]]], label: str, path: str | Path
) -> Path:
    """Per test volume: Dice against its total lesion volume (ml, log scale), one
    marker per data set."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (ds, pts), marker in zip(points.items(), "os^vD"):
        pts = [(v, d) for v, d in pts if v > 0 and np.isfinite(d)]
        if pts:
            v, d = np.array(pts).T
            ax.scatter(v, 100 * d, marker=marker, label=f"{shown_name(ds)} ({len(pts)})", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("lesion volume of the scan (ml)")
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(-2, 100)
    ax.set_title(f"{label}: Dice per test volume")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, path)


def figure_curves(
    columns: Mapping[str, Sequence[float]],
    x: Sequence[float],
    path: str | Path,
    xlabel: str = "step",
) -> Path:
    """Training curves (e.g. train and validation loss against steps)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, ys in columns.items():
        pts = [(a, b) for a, b in zip(x, ys) if b is not None and not math.isnan(b)]
        if pts:
            ax.plot(*zip(*pts), label=name, lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _cell_html(text: str) -> str:
    """Escape a Markdown cell; keep its two marks: **best** (bold), <u>second</u> (underline)."""
    t = text.strip()
    if t.startswith("**") and t.endswith("**") and len(t) > 4:
        return f"<b>{html.escape(t[2:-2])}</b>"
    if t.startswith("<u>") and t.endswith("</u>"):
        return f"<u>{html.escape(t[3:-4])}</u>"
    return html.escape(t)


def _markdown_table_to_html(md: str) -> str:
    lines = [ln.strip().strip("|").split("|") for ln in md.strip().splitlines()]
    head, body = lines[0], lines[2:]
    out = (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
        + "</tr></thead><tbody>"
    )
    for row in body:
        out += "<tr>" + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>"
    return out + "</tbody></table>"


def image_src(image: str | Path, page: str | Path) -> str:
    """The `src` of an image on a page: its path relative to the page's folder (URL
    quoted, '/' separators). `image` is absolute or relative to the working directory,
    like any other path here; the result does not depend on the working directory."""
    rel = os.path.relpath(Path(image).resolve(), Path(page).resolve().parent)
    return urllib.parse.quote(Path(rel).as_posix())


def write_html(path: str | Path, title: str, sections: Sequence[Mapping]) -> Path:
    """One page; images are referenced relative to it (so the folder can be moved or
    served as is). Section keys: heading, and any of text (paragraphs), pre
    (preformatted), table (Markdown table), images (paths, absolute or relative to
    the working directory)."""
    path = Path(path)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}"
        "pre{background:#f4f4f4;padding:0.6em;white-space:pre-wrap;overflow-wrap:anywhere}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec['heading'])}</h2>")
        if sec.get("text"):
            for para in str(sec["text"]).split("\n\n"):
                parts.append(f"<p>{html.escape(para)}</p>")
        if sec.get("pre"):
            parts.append(f"<pre>{html.escape(sec['pre'])}</pre>")
        if sec.get("table"):
            parts.append(_markdown_table_to_html(sec["table"]))
        for img in sec.get("images", ()):
            src = html.escape(image_src(img, path))
            parts.append(f"<img src='{src}' alt='{html.escape(Path(img).stem)}'>")
    parts.append("</body></html>")
    write_atomic(path, "\n".join(parts))
    return path
