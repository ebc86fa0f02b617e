"""The files of an evaluation: per-volume CSVs and JSON, each written under a temporary
name and renamed into place (outputs.py)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import write_text_atomic


def write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)  # a temporary name (outputs.py), then one rename


def write_subject_csv(
    records: Sequence[dict], path: str | Path, context: dict[str, Any] | None = None
) -> None:
    """One row per volume; `context` columns (split, model, threshold) are repeated on each row."""
    context = context or {}
    cols: list[str] = list(context)
    for r in records:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in records:
        w.writerow({**context, **{k: _fmt(v) for k, v in r.items()}})
    write_atomic(Path(path), buf.getvalue())


def read_subject_csv(
    path: str | Path, metrics: Sequence[str]
) -> list[tuple[str, dict[str, float]]]:
    """(subject, {metric: value}) per row of a DATASET_test_subjects.csv, in its order;
    an empty cell (a metric undefined for that volume) reads as NaN."""
    with Path(path).open(newline="") as fh:
        return [
            (r["subject"], {m: float(r[m]) if r.get(m) else math.nan for m in metrics})
            for r in csv.DictReader(fh)
        ]


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


def write_json(obj: dict, path: str | Path) -> None:
    write_atomic(Path(path), json.dumps(_clean(obj), indent=2))
