"""Split + checkpoint -> metrics, per-subject CSVs, a JSON summary and the report.

    summary = evaluate_model(model, "DATA", "runs/cpu/eval")          # MAEDiff
    summary = evaluate_model(None, "DATA", "runs/thresh", label="Thresh")  # baseline
    write_report([summary_a, summary_b], "report/")

`model=None` is the intensity-thresholding baseline (Thresh in Table 1): the
"reconstruction" is zero, so the anomaly map is the image itself, post-processed
and thresholded by exactly the same protocol.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import DataConfig
from .data.datasets import load_subject
from .data.splits import Subject, read_pddpm_split
from .detect import reconstruct_volume
from .evaluation.aggregate import combine_runs, summarise, write_json, write_subject_csv
from .evaluation.postprocess import remove_small_components
from .evaluation.protocol import (
    EvalSettings,
    VolumeResult,
    evaluate_healthy,
    evaluate_split,
    score_volume,
)
from .evaluation.report import (
    figure_dice_distribution,
    figure_examples,
    figure_pr_curves,
    results_table,
    write_html,
)
from .model import MAEDiff

ANOMALY_SETS = ("Brats21", "MSLUB")


def _volumes(
    subjects: Sequence[Subject],
    model: MAEDiff | None,
    data_cfg: DataConfig,
    seed: int,
    keep: list | None,
    n_keep: int,
    bar: tqdm | None,
) -> Iterator[VolumeResult]:
    """Load, reconstruct and yield volumes one at a time (keeping the first n_keep)."""
    for s in subjects:
        vol = load_subject(s, data_cfg)
        if model is None:
            rec = np.zeros_like(vol.image)
        else:
            rec = reconstruct_volume(model, vol, torch.Generator().manual_seed(seed))
        v = VolumeResult(s.name, vol.image, rec, vol.brain_mask, vol.segmentation)
        if keep is not None and len(keep) < n_keep:
            keep.append(v)
        if bar is not None:
            bar.update()
        yield v


def _limit(subjects: list[Subject], n: int | None) -> list[Subject]:
    return subjects[:n] if n else subjects


def evaluate_model(
    model: MAEDiff | None,
    data_dir: str | Path,
    out_dir: str | Path,
    label: str = "MAEDiff",
    datasets: Sequence[str] = ANOMALY_SETS,
    healthy_test: bool = True,
    fold: int = 0,
    data_cfg: DataConfig | None = None,
    settings: EvalSettings = EvalSettings(),
    n_jobs: int = 2,
    seed: int = 0,
    max_volumes: int | None = None,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, Any]:
    """Run the protocol (PROTOCOL.md §7) on every data set and write the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg = data_cfg or (model.cfg.data if model is not None else DataConfig())
    info = getattr(model, "checkpoint_info", {}) if model is not None else {}
    summary: dict[str, Any] = {
        "model": label,
        "checkpoint": info.get("path"),
        "config": model.cfg.name if model is not None else None,
        "data_dir": str(data_dir),
        "fold": fold,
        "datasets": {},
        "settings": settings.__dict__,
    }
    curves, dice_dists, examples_png = {}, {}, []
    start = time.perf_counter()
    for ds in datasets:
        val = _limit(read_pddpm_split(data_dir, ds, "val"), max_volumes)
        test = _limit(read_pddpm_split(data_dir, ds, "test"), max_volumes)
        bar = tqdm(
            total=len(val) + len(test), desc=f"{label} {ds}", unit="vol", disable=not progress
        )
        kept: list[VolumeResult] = []
        t0 = time.perf_counter()
        outcome = evaluate_split(
            _volumes(val, model, data_cfg, seed, None, 0, bar),
            _volumes(test, model, data_cfg, seed, kept, 3, bar),
            settings,
            n_jobs=n_jobs,
        )
        bar.close()
        context = {
            "model": label,
            "dataset": ds,
            "split": "test",
            "fold": fold,
            "threshold": outcome.threshold,
        }
        write_subject_csv(outcome.records, out / f"{ds}_test_subjects.csv", context)
        stats = summarise(outcome.records)
        summary["datasets"][ds] = {
            "threshold": outcome.threshold,
            "threshold_source": f"{ds} val ({len(val)} volumes, pooled Dice {outcome.val_dice:.4f})",
            "n_test": len(test),
            "metrics": stats,
            "seconds": round(time.perf_counter() - t0, 1),
            "note": "oracle_best_dice chooses the threshold on each test volume itself: an upper bound, not a result",
        }
        curves[f"{label} {ds}"] = (outcome.curve_scores, outcome.curve_labels)
        dice_dists[f"{label} {ds}"] = [r.get("dice", float("nan")) for r in outcome.records]
        if figures and kept:
            examples_png.append(
                _example_figure(kept, outcome.threshold, settings, out / f"examples_{ds}.png")
            )
    if healthy_test:
        subjects = _limit(read_pddpm_split(data_dir, "IXI", "test"), max_volumes)
        bar = tqdm(total=len(subjects), desc=f"{label} IXI test", unit="vol", disable=not progress)
        records = evaluate_healthy(_volumes(subjects, model, data_cfg, seed, None, 0, bar))
        bar.close()
        write_subject_csv(
            records,
            out / "IXI_test_subjects.csv",
            {"model": label, "dataset": "IXI", "split": "test", "fold": fold},
        )
        summary["datasets"]["IXI"] = {
            "n_test": len(subjects),
            "metrics": summarise(records, ("l1",)),
        }
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if figures and curves:
        summary["figures"] = {
            "examples": [p.name for p in examples_png],
            "pr_curves": figure_pr_curves(curves, out / "pr_curves.png").name,
            "dice": figure_dice_distribution(dice_dists, out / "dice_per_subject.png").name,
        }
        np.savez_compressed(
            out / "curves.npz",
            **{f"{k}|scores": v[0] for k, v in curves.items()},
            **{f"{k}|labels": v[1] for k, v in curves.items()},
        )
    write_json(summary, out / "summary.json")
    write_report([summary], out)
    return summary


def _example_figure(
    kept: list[VolumeResult], threshold: float, settings: EvalSettings, path: Path
) -> Path:
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
    return figure_examples(ex, path)


def table_rows(summaries: Sequence[dict[str, Any]]) -> tuple[list[dict], list[str]]:
    """One row per model label; several summaries of one label (folds, seeds) are
    combined as mean +- std of their per-volume means."""
    by_label: dict[str, list[dict]] = {}
    for s in summaries:
        by_label.setdefault(s["model"], []).append(s)
    datasets = [ds for ds in (*ANOMALY_SETS, "IXI") if any(ds in s["datasets"] for s in summaries)]
    rows = []
    for label, group in by_label.items():
        row: dict[str, Any] = {
            "model": label if len(group) == 1 else f"{label} ({len(group)} runs)"
        }
        for ds in datasets:
            parts = [s["datasets"][ds]["metrics"] for s in group if ds in s["datasets"]]
            if parts:
                row[ds] = parts[0] if len(parts) == 1 else combine_runs(parts)
        rows.append(row)
    return rows, datasets


def write_report(summaries: Sequence[dict[str, Any]], out_dir: str | Path) -> Path:
    """Table 1 style Markdown + CSV and one HTML page with the figures of each summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, datasets = table_rows(summaries)
    anomaly = [d for d in datasets if d != "IXI"]
    md, csv_text = results_table(rows, anomaly, ["IXI"] if "IXI" in datasets else [])
    (out / "results.md").write_text(md)
    (out / "results.csv").write_text(csv_text)
    sections = [
        {
            "heading": "Results",
            "table": md,
            "text": "Dice with the threshold chosen on the pooled unhealthy validation volumes of each data set; AUPRC per volume, averaged; l1 on healthy test volumes, in units of 1e-3. Means over volumes; with several runs of one model, mean ± std over runs.",
        }
    ]
    if len(summaries) > 1:
        sections[0]["images"] = _combined_figures(summaries, out)
    for idx, s in enumerate(summaries, 1):
        src = Path(s.get("_dir") or out)  # folder holding this summary's figures
        lines = [
            f"checkpoint: {s.get('checkpoint') or 'none (baseline)'}",
            f"data: {s.get('data_dir')}  fold: {s.get('fold')}",
        ]
        for ds, d in s["datasets"].items():
            if "threshold" in d:
                m = d["metrics"]
                oracle = m.get("oracle_best_dice", {}).get("mean", float("nan"))
                lines.append(
                    f"{ds}: threshold {d['threshold']:.4f} from {d['threshold_source']}; {d['n_test']} test volumes; oracle best Dice (upper bound, not a result) {oracle:.4f}"
                )
        images = []
        for name in [
            *s.get("figures", {}).get("examples", []),
            s.get("figures", {}).get("pr_curves"),
            s.get("figures", {}).get("dice"),
        ]:
            if name and (src / name).exists():
                same = src.resolve() == out.resolve()
                target = out / (name if same else f"{idx}-{s['model']}_{name}")
                if not same:
                    shutil.copyfile(src / name, target)
                images.append(target)
        sections.append(
            {
                "heading": f"{s['model']} (fold {s.get('fold')})",
                "pre": "\n".join(lines),
                "images": images,
            }
        )
    return write_html(out / "report.html", "maediff report", sections)


def _combined_figures(summaries: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """PR curves and per-subject Dice of all summaries in one figure each."""
    import csv

    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    dice: dict[str, list[float]] = {}
    for idx, s in enumerate(summaries, 1):
        src = Path(s.get("_dir") or out)
        tag = (
            s["model"]
            if sum(x["model"] == s["model"] for x in summaries) == 1
            else f"{s['model']} #{idx}"
        )
        if (src / "curves.npz").exists():
            with np.load(src / "curves.npz") as z:
                for key in z.files:
                    name, part = key.rsplit("|", 1)
                    ds = name.split(" ", 1)[1] if " " in name else name
                    label = f"{tag} {ds}"
                    sc, lab = curves.get(label, (None, None))
                    curves[label] = (z[key], lab) if part == "scores" else (sc, z[key])
        for ds in ANOMALY_SETS:
            f = src / f"{ds}_test_subjects.csv"
            if f.exists():
                dice[f"{tag} {ds}"] = [
                    float(r["dice"]) if r.get("dice") else float("nan")
                    for r in csv.DictReader(f.open())
                ]
    images = []
    curves = {k: v for k, v in curves.items() if v[0] is not None and v[1] is not None}
    if curves:
        images.append(figure_pr_curves(curves, out / "pr_curves_all.png"))
    if dice:
        images.append(figure_dice_distribution(dice, out / "dice_per_subject_all.png"))
    return images


def load_summary(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    f = p / "summary.json" if p.is_dir() else p
    if not f.exists():
        raise ValueError(f"{p} holds no summary.json (run `maediff evaluate` first)")
    try:
        s = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from e
    s["_dir"] = str(f.parent)
    return s
