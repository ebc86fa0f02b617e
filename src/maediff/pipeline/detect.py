"""Volumes -> healthy reconstructions -> anomaly maps, and NIfTI files back in the
input's own space.

    model = load_model("runs/cpu", device)
    rec = reconstruct_volume(model, prepared_volume, generator)     # model grid (X, Y, Z)
    report = detect_files(read_inputs("scans/"), "out/", model)

When the model works on slices smaller than the volume grid (the `cpu` preset runs at
48x48 on the protocol's 96x96 slices), the residual is computed at the model's size
and carried back: rec = x + upsample(rec_small - x_small). The anomaly map |x - rec|
is then the upsampled model residual, and the full-resolution image detail that the
model never saw does not show up as anomaly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.bids import write_description
from ..data.datasets import load_subject, slices_to_volume, volume_to_slices
from ..data.io import DataError, save_like
from ..data.load import PreparedVolume
from ..data.splits import Subject
from ..evaluation.postprocess import anomaly_scores, remove_small_components
from ..evaluation.protocol import EvalSettings

if TYPE_CHECKING:
    from ..config import DataConfig
    from ..models import AnomalyModel

OUTPUTS = ("anomaly", "score", "reconstruction")


def reconstruct_volume(
    model: AnomalyModel,
    volume: PreparedVolume | np.ndarray,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    amp: str | None = None,
    progress: bool = False,
    skip_empty_patches: bool | None = None,
) -> np.ndarray:
    """Healthy reconstruction of a (X, Y, Z) volume in [0, 1] on its own grid (Alg. 2 per slice).

    skip_empty_patches: leave out patches without brain (needs a PreparedVolume, whose
    brain mask says where the brain is); None takes `model.cfg.inference.skip_empty_patches`.
    The evaluation protocol passes False: every patch is reconstructed.

    `model` is duck-typed: it needs `cfg.geometry.image_size`,
    `cfg.inference.skip_empty_patches` and `reconstruct(slices, generator, batch_size=,
    amp=, progress=, brain_mask=)`, where `progress(n)` reports n units of work done
    (whatever the model counts: the bar has no fixed total).
    """
    image = volume.image if isinstance(volume, PreparedVolume) else volume
    # a model that works at any size (Thresh) sees the volume's own slices
    size = image.shape[0] if getattr(model, "any_size", False) else model.cfg.geometry.image_size
    small = volume_to_slices(image, size)  # (Z, 1, size, size)
    skip = (
        model.cfg.inference.skip_empty_patches if skip_empty_patches is None else skip_empty_patches
    )
    brain, extra = None, {}
    if isinstance(volume, PreparedVolume):
        mask = (volume_to_slices(volume.brain_mask.astype(np.float32), size) > 0).float()
        brain = mask if skip else None
        if getattr(model.cfg.inference, "patch_selection", "all") == "guided":
            extra["guide_mask"] = mask  # where guided selection looks for anomalies
    desc = f"reconstructing {small.shape[0]} slices"
    with tqdm(total=None, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        rec_small = model.reconstruct(
            small,
            generator,
            batch_size=batch_size,
            amp=amp,
            progress=bar.update,
            brain_mask=brain,
            **extra,
        )
    # the model computes where its weights are (a GPU): the residual is taken on the CPU,
    # where the input slices are
    rec_small = rec_small.float().cpu()
    if image.shape[:2] == (size, size):
        return slices_to_volume(rec_small, image.shape)
    correction = slices_to_volume(rec_small - small, image.shape)
    return np.clip(image + correction, 0.0, 1.0).astype(np.float32)


def reconstruct_subject(
    model: AnomalyModel, subject: Subject, data_cfg: DataConfig, seed: int
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """What the evaluation protocol needs of one subject: (name, image, brain mask,
    segmentation, reconstruction with every patch, the grid's affine), the noise seeded
    by `seed`."""
    vol = load_subject(subject, data_cfg)
    rec = reconstruct_volume(
        model, vol, torch.Generator().manual_seed(seed), skip_empty_patches=False
    )
    return subject.name, vol.image, vol.brain_mask, vol.segmentation, rec, vol.affine


def output_paths(out_dir: str | Path, name: str, bids: bool = False) -> dict[str, Path]:
    """Output files of one input, named after it. BIDS style: NAME_desc-anomalymap_T2w.nii.gz
    for an input NAME_T2w (the last entity is kept as the suffix)."""
    out = Path(out_dir)
    if bids:
        stem, _, suffix = name.rpartition("_") if "_" in name else (name, "", "T2w")
        suffix = suffix or "T2w"
        desc = {
            "anomaly": "anomalymap",
            "score": "anomalyscore",
            "reconstruction": "reconstruction",
            "prediction": "anomalymask",
        }
        return {k: out / f"{stem}_desc-{v}_{suffix}.nii.gz" for k, v in desc.items()}
    return {k: out / f"{name}_{k}.nii.gz" for k in (*OUTPUTS, "prediction")}


@dataclass
class DetectReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def subject_outputs(out_dir: str | Path, subject: Subject, bids: bool = False) -> dict[str, Path]:
    """output_paths for one subject; a BIDS subject's files go to its own folder
    (OUT/sub-01/ses-1/anat/) and always have BIDS names."""
    if subject.folder is not None:
        return output_paths(Path(out_dir) / subject.folder, subject.name, bids=True)
    return output_paths(out_dir, subject.name, bids)


def detect_subject(
    model: AnomalyModel,
    subject: Subject,
    out_dir: str | Path,
    generator: torch.Generator,
    threshold: float | None = None,
    bids: bool = False,
    batch_size: int | None = None,
    amp: str | None = None,
) -> dict[str, Path]:
    """One scan -> anomaly map (raw |x - rec|), post-processed score map, reconstruction
    and, with a threshold, a binary prediction; all in the input file's voxel grid."""
    vol = load_subject(subject, model.cfg.data)
    rec = reconstruct_volume(model, vol, generator, batch_size, amp)
    residual = np.abs(vol.image - rec)
    post = EvalSettings()  # the protocol's post-processing (evaluation/postprocess.py)
    scores = anomaly_scores(residual, vol.brain_mask, post.erosion_iterations, post.median_size)
    maps = {"anomaly": residual, "score": scores, "reconstruction": rec}
    paths = subject_outputs(out_dir, subject, bids)
    written = {}
    for key, data in maps.items():
        written[key] = save_like(vol.to_input_space(data), vol.input_reference, paths[key])
    if threshold is not None:
        pred = remove_small_components(scores > threshold, post.min_component).astype(np.float32)
        written["prediction"] = save_like(
            vol.to_input_space(pred, labels=True) > 0.5,
            vol.input_reference,
            paths["prediction"],
            dtype=np.uint8,
        )
    if subject.folder is not None:  # BIDS derivatives: a sidecar naming the source scan
        source = f"bids:raw:{subject.folder}/{subject.image.name}"
        for key, path in written.items():
            sidecar = {"Sources": [source], "Description": SIDECAR_TEXT[key]}
            if key == "prediction":
                sidecar["Threshold"] = threshold
            side = path.with_name(path.name.removesuffix(".nii.gz").removesuffix(".nii") + ".json")
            tmp = side.with_name(f".{side.name}.tmp")
            tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
            tmp.replace(side)
    return written


SIDECAR_TEXT = {
    "anomaly": "maediff anomaly map |x - reconstruction| (intensity units of the standardised scan)",
    "score": "maediff anomaly score: the map after the protocol's post-processing (brain mask eroded, 5x5x5 median)",
    "reconstruction": "maediff healthy reconstruction of the scan",
    "prediction": "maediff binary anomaly map: score above Threshold, small components removed",
}


def check_detect_arguments(
    out_dir: str | Path, threshold: float | None, batch_size: int | None
) -> None:
    """Arguments that would fail after the reconstruction, or silently: an output that
    is a file, a threshold that is not a number (NaN marks nothing), a batch size < 1."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"--threshold {threshold} must be a finite number")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")


def detect_files(
    subjects: Sequence[Subject],
    out_dir: str | Path,
    model: AnomalyModel,
    overwrite: bool = False,
    threshold: float | None = None,
    bids: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    amp: str | None = None,
    progress: bool = True,
    bids_source: str | Path | None = None,
) -> DetectReport:
    """Run detection on many scans; a bad file is reported and skipped, not fatal.
    bids_source: the BIDS data set the subjects come from; `out_dir` then becomes a
    derivatives data set (dataset_description.json, the input's sub-*/ses-*/anat
    folders, BIDS names)."""
    check_detect_arguments(out_dir, threshold, batch_size)
    report = DetectReport()
    start = time.perf_counter()
    if bids_source is not None:  # a BIDS input: the outputs form a derivatives data set
        write_description(out_dir, bids_source)
    for s in tqdm(subjects, desc="detecting", unit="scan", disable=not progress):
        paths = subject_outputs(out_dir, s, bids)
        wanted = [paths[k] for k in OUTPUTS] + (
            [paths["prediction"]] if threshold is not None else []
        )
        if not overwrite and all(p.exists() for p in wanted):
            report.skipped.append(s.name)
            continue
        g = torch.Generator().manual_seed(seed)
        try:
            detect_subject(model, s, out_dir, g, threshold, bids, batch_size, amp)
            report.written.append(s.name)
        except (DataError, ValueError, RuntimeError) as e:
            report.failed.append((str(s.image), str(e)))
    report.seconds = time.perf_counter() - start
    return report


__all__ = [
    "DetectReport",
    "check_detect_arguments",
    "detect_files",
    "detect_subject",
    "output_paths",
    "reconstruct_volume",
    "subject_outputs",
]
