"""The common case in Python: load a model, map one NIfTI scan, read its scores
(docs/labelfree.md §From Python).

    import maediff
    model = maediff.load_model("maediff-cpu")                # a name, run folder or file
    result = maediff.map_scan(model, "scan.nii.gz")         # NAME_mask.nii.gz beside it is used
    result.scores["anomaly_score"], result.qc               # the scores.csv row, the checks
    result.score_map                                        # nibabel image, the scan's grid
    result.save("maps/")                                    # the files `maediff detect` writes

`map_scan` is `maediff detect` for one scan, without its folder bookkeeping: the same
load-time processing, checks against the training data (data/qc.py), reconstruction,
post-processing and scores, and maps resampled onto the input scan's voxel grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .data.datasets import load_subject
from .data.io import DataError, atomic_save
from .data.load import PreparedVolume
from .data.qc import qc_text, scan_flags
from .data.splits import subject_from_scan
from .evaluation.postprocess import remove_small_components
from .evaluation.protocol import EvalSettings
from .pipeline.detect import anomaly_maps
from .pipeline.scores import scan_scores_of
from .training.checkpoint import load_model


@dataclass
class ScanResult:
    """One scan mapped: the maps on the input's voxel grid (nibabel images), its
    scalar scores (the columns of scores.csv) and the flags of the checks."""

    name: str
    anomaly_map: nib.Nifti1Image  # |x - reconstruction|
    score_map: nib.Nifti1Image  # after the protocol's post-processing
    reconstruction: nib.Nifti1Image
    prediction: nib.Nifti1Image | None  # the binary map, with a threshold
    scores: dict[str, Any] = field(default_factory=dict)
    flags: list[tuple[str, str]] = field(default_factory=list)  # (flag, reason)

    @property
    def qc(self) -> str:
        """The flags as scores.csv's `qc` column writes them ('' when none)."""
        return qc_text(self.flags)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """NAME_anomaly / _score / _reconstruction (/ _prediction).nii.gz in `out_dir`;
        an existing file is not replaced."""
        out = Path(out_dir)
        maps = {
            "anomaly": self.anomaly_map,
            "score": self.score_map,
            "reconstruction": self.reconstruction,
            "prediction": self.prediction,
        }
        paths = {k: out / f"{self.name}_{k}.nii.gz" for k, v in maps.items() if v is not None}
        there = [p for p in paths.values() if p.exists()]
        if there:
            raise DataError(f"{there[0]} exists; choose another folder")
        out.mkdir(parents=True, exist_ok=True)
        for k, p in paths.items():
            atomic_save(maps[k], p)
        return paths


def map_scan(
    model: Any,
    image: str | Path,
    mask: str | Path | None = None,
    threshold: float | None = None,
    seed: int | None = None,
) -> ScanResult:
    """Map one NIfTI scan with a loaded model (load_model). `mask`: its brain mask
    (default: NAME_mask.nii.gz beside it, else image > 0); `threshold`: also the binary
    map; `seed`: the noise seed (default: the model's inference.seed)."""
    subject = subject_from_scan(Path(image))
    if mask is not None:
        subject = replace(subject, mask=Path(mask))
    vol = load_subject(subject, model.cfg.data)
    flags = scan_flags(subject, vol, model.cfg.data.trained_on)
    g = torch.Generator().manual_seed(model.cfg.inference.seed if seed is None else seed)
    rec, residual, scores = anomaly_maps(model, vol, g)
    pred = None
    if threshold is not None:
        binary = remove_small_components(scores > threshold, EvalSettings().min_component)
        pred = _image(vol, binary.astype(np.float32), labels=True)
    return ScanResult(
        name=subject.name,
        anomaly_map=_image(vol, residual),
        score_map=_image(vol, scores),
        reconstruction=_image(vol, rec),
        prediction=pred,
        scores=scan_scores_of(vol, scores, threshold),
        flags=flags,
    )


def _image(vol: PreparedVolume, data: np.ndarray, labels: bool = False) -> nib.Nifti1Image:
    """A model-grid array as a NIfTI image on the input scan's grid (detect's files)."""
    back = vol.to_input_space(data, labels=labels)
    dtype = np.uint8 if labels else np.float32
    header = vol.input_reference.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(
        (back > 0.5 if labels else back).astype(dtype), vol.input_reference.affine, header
    )
    img.header.set_slope_inter(None, None) if labels else img.header.set_slope_inter(1.0, 0.0)
    return img


__all__ = ["ScanResult", "load_model", "map_scan"]
