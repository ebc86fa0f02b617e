"""The per-scan scores table that `detect` writes beside the maps (docs/labelfree.md).

    table = ScoresTable.open("maps/", bids=False)      # maps/scores.csv (rows of earlier runs kept)
    table.put(subject, scan_scores_of(vol, scores, threshold), threshold, "how it was set")
    table.write()                                        # atomically, after every scan

One row per scan: its scalar anomaly scores (evaluation/calibration.py: scan_scores)
and the threshold that made its binary map. A BIDS output (a derivatives data set)
gets `scores.tsv` at its root instead, tab-separated with `participant_id` (and
`session_id`) first, "n/a" for missing values, and a `scores.json` sidecar that
describes every column, as BIDS asks of tabular files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import DataError, Subject
from ..data.load import PreparedVolume
from ..evaluation.calibration import Calibration, scan_scores
from ..evaluation.postprocess import MIN_COMPONENT

COLUMNS = {
    "scan": "the scan's name (its file name without extension)",
    "image": "the scan's file, relative to the input where it lies under it",
    "anomaly_score": "mean of the top 1 % anomaly scores inside the brain (the evaluation's scan score)",
    "score_p99": "99th percentile of the anomaly scores inside the brain",
    "brain_ml": "brain volume in ml (the brain mask on the model grid)",
    "threshold": "the threshold of the binary map (empty: none given)",
    "anomalous_ml": "volume in ml above the threshold, small components removed (the binary map)",
    "components": "connected components (26-connected) of the binary map",
    "control_percentile": "percentage of the calibration's healthy scans whose anomaly_score is lower",
    "threshold_source": "how the threshold was set",
    "qc": "flags of the checks before scoring, joined by ';' (empty: none): the input's own (data/checks.py) and against the model's training data (data/qc.py); docs/labelfree.md",
}
BIDS_KEYS = ("participant_id", "session_id")


def scan_scores_of(
    vol: PreparedVolume,
    scores: np.ndarray,
    threshold: float | None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """scan_scores of a prepared scan's score map (X, Y, Z), volumes in ml of its grid."""
    voxel_ml = float(abs(np.linalg.det(vol.affine[:3, :3]))) / 1000.0
    return scan_scores(scores, vol.brain_mask, voxel_ml, threshold, MIN_COMPONENT, calibration)


def _text(v: Any, missing: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class ScoresTable:
    """The rows of scores.csv (scores.tsv for BIDS output) under an output folder."""

    def __init__(self, path: Path, bids: bool, rows: dict[str, dict[str, str]]) -> None:
        self.path, self.bids, self.rows = path, bids, rows

    @classmethod
    def open(cls, out_dir: str | Path, bids: bool = False) -> ScoresTable:
        """The table of `out_dir`, with the rows an earlier run wrote (none if new)."""
        path = Path(out_dir) / ("scores.tsv" if bids else "scores.csv")
        rows: dict[str, dict[str, str]] = {}
        if path.is_file():
            try:
                with path.open(newline="") as f:
                    for row in csv.DictReader(f, delimiter="\t" if bids else ","):
                        rows[row["scan"]] = row
            except (KeyError, csv.Error, UnicodeDecodeError) as e:
                raise DataError(
                    f"{path} is not a scores table written by maediff detect: {e!r}"
                ) from e
        return cls(path, bids, rows)

    @property
    def missing(self) -> str:
        return "n/a" if self.bids else ""

    def current(self, name: str, threshold: float | None) -> bool:
        """Whether the table holds scores of `name` made with `threshold`."""
        row = self.rows.get(name)
        if row is None:
            return False
        had = row.get("threshold", "")
        if threshold is None:
            return had in ("", "n/a")
        try:
            return math.isclose(float(had), threshold, rel_tol=1e-5)
        except ValueError:
            return False

    def put(
        self,
        subject: Subject,
        scores: dict[str, Any],
        threshold: float | None,
        source: str | None,
        input_root: str | Path | None = None,
    ) -> None:
        image = subject.image
        if input_root is not None and Path(input_root).is_dir():
            try:
                image = subject.image.resolve().relative_to(Path(input_root).resolve())
            except ValueError:
                pass
        values = {
            "scan": subject.name,
            "image": image.as_posix(),
            **scores,
            "threshold": threshold,
            "threshold_source": source if threshold is not None else None,
        }
        row = {k: _text(values.get(k), self.missing) for k in COLUMNS}
        if self.bids:
            ents = dict(p.split("-", 1) for p in subject.name.split("_") if "-" in p)
            row = {
                "participant_id": f"sub-{ents['sub']}" if "sub" in ents else self.missing,
                "session_id": f"ses-{ents['ses']}" if "ses" in ents else self.missing,
                **row,
            }
        self.rows[subject.name] = row

    def write(self) -> Path:
        """Every row, sorted by scan, to a temporary file renamed into place; for BIDS
        output also the scores.json sidecar."""
        keys = [*(BIDS_KEYS if self.bids else ()), *COLUMNS]
        buf = io.StringIO()
        w = csv.DictWriter(
            buf,
            keys,
            delimiter="\t" if self.bids else ",",
            lineterminator="\n",
            extrasaction="ignore",
        )
        w.writeheader()
        for name in sorted(self.rows):
            w.writerow({k: self.rows[name].get(k, self.missing) for k in keys})
        _atomic_write(self.path, buf.getvalue())
        if self.bids:
            doc = {k: {"Description": v} for k, v in COLUMNS.items()}
            doc["participant_id"] = {"Description": "the participant (BIDS sub- label)"}
            doc["session_id"] = {"Description": "the session (BIDS ses- label), n/a without one"}
            _atomic_write(self.path.with_suffix(".json"), json.dumps(doc, indent=2) + "\n")
        return self.path


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["COLUMNS", "ScoresTable", "scan_scores_of"]
