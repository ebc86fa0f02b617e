"""Is this scan like the ones the model was trained on? (docs/labelfree.md §Checks
before scoring)

    record = training_record(subjects, volumes, contrast="T2w")    # at training time
    flags = check_scan(measure_scan(image_nii, mask_nii, vol), record)
    # [("contrast", "intensity profile outside the training range: ..."), ...]

A model reconstructs what it has seen: a scan of another contrast, a scan with the
skull or a noisy background left in, or a brain cut by the field of view comes back
as anomalous, and its map looks as plausible as any other. The training scans are
measured when training starts (`training_record`, saved in the model's
`data.trained_on`, config.TrainingRecord) and every scan `detect` maps is measured the
same way and compared (`check_scan`). A flag does not stop the scan; `detect --strict`
does.

Measures, per scan (`ScanMeasures`):
- on the input file: voxel size, field of view, brain volume and bounding box (of the
  brain mask, or `image > 0` without one), share of the voxels outside the brain that
  carry signal (> 5 % of the brain's 99th percentile), share of the field of view the
  brain fills;
- on the model grid (after the load-time rescale): the intensity landmarks of the
  brain (NYUL_PERCENTILES, as for histogram standardisation), the scan's contrast
  profile.

Flags (each with its reason), against the training range widened by a margin
(`Margins`): `contrast` (a landmark outside its range), `brain_volume`, `brain_extent`,
`skull_or_background` (signal outside the brain mask, or a "brain" that fills the field
of view: the image > 0 of a scan with skull or background noise), `field_of_view` (the
field of view is smaller than the smallest training brain: the brain is cut) and
`resolution` (voxels much coarser than the training scans'). Whether a voxel size or a
mask is valid at all is another matter (data/checks.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ..config import TrainingRecord
from .io import Subject, load_nifti
from .load import PreparedVolume, nyul_landmarks

FLAGS = (
    "contrast",
    "brain_volume",
    "brain_extent",
    "skull_or_background",
    "field_of_view",
    "resolution",
)
SIGNAL = 0.05  # a voxel carries signal above this share of the brain's 99th percentile


@dataclass(frozen=True)
class Margins:
    """How far beyond the training range a scan may lie before it is flagged: the
    training scans are few, and healthy brains vary more than any one data set shows."""

    landmark: float = 0.15  # intensity units of the rescaled brain ([0, 1])
    volume: float = 1.3  # factor on the brain volume range (both ways)
    extent: float = 1.2  # factor on the brain's bounding-box range (both ways)
    outside: float = 0.05  # share of the outside voxels, over the training maximum
    fill: float = 1.5  # factor on the largest share of the field of view a brain filled
    voxel: float = 2.0  # factor on the coarsest training voxel


@dataclass(frozen=True)
class ScanMeasures:
    """What check_scan compares; lengths (mm) sorted ascending, so that the checks do
    not depend on the scan's orientation."""

    voxel_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    brain_ml: float
    extent_mm: tuple[float, float, float]
    outside_signal: float
    brain_fraction: float
    landmarks: tuple[float, ...]


def measure_scan(
    image: nib.Nifti1Image, mask: nib.Nifti1Image | None, vol: PreparedVolume
) -> ScanMeasures:
    """The measures of one scan: `image` and `mask` as given (the input files), `vol`
    the same scan on the model grid (load_subject)."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = np.asarray(mask.dataobj) > 0 if mask is not None else data > 0
    voxel = np.linalg.norm(image.affine[:3, :3], axis=0)
    idx = np.argwhere(brain)
    extent = (idx.max(0) - idx.min(0) + 1) * voxel if idx.size else np.zeros(3)
    outside = ~brain
    level = SIGNAL * float(np.percentile(data[brain], 99)) if brain.any() else 0.0
    signal = float((data[outside] > level).mean()) if outside.any() else 0.0
    return ScanMeasures(
        voxel_mm=_sorted3(voxel),
        fov_mm=_sorted3(np.array(data.shape[:3]) * voxel),
        brain_ml=float(brain.sum() * np.prod(voxel) / 1000.0),
        extent_mm=_sorted3(extent),
        outside_signal=signal,
        brain_fraction=float(brain.mean()),
        landmarks=tuple(float(x) for x in nyul_landmarks(vol.image, vol.brain_mask)),
    )


def _sorted3(v: np.ndarray) -> tuple[float, float, float]:
    a, b, c = sorted(float(x) for x in v)
    return (a, b, c)


def training_record(
    measures: Sequence[ScanMeasures],
    contrast: str = "",
    skull_stripped: bool | None = None,
    source: str = "",
) -> TrainingRecord:
    """The record of the training scans (config.TrainingRecord): ranges of their
    measures. skull_stripped: None takes it from the scans (no signal outside the brain
    in any of them)."""
    if not measures:
        return TrainingRecord()

    def span(values) -> tuple[float, float]:
        v = [float(x) for x in values]
        return (round(min(v), 4), round(max(v), 4))

    lm = np.array([m.landmarks for m in measures])
    outside = max(m.outside_signal for m in measures)
    stripped = outside < 0.01 if skull_stripped is None else skull_stripped
    return TrainingRecord(
        scans=len(measures),
        contrast=contrast,
        skull_stripped="yes" if stripped else "no",
        source=source,
        voxel_mm=span(v for m in measures for v in m.voxel_mm),
        fov_mm=span(v for m in measures for v in m.fov_mm),
        brain_ml=span(m.brain_ml for m in measures),
        extent_mm=span(v for m in measures for v in m.extent_mm),
        outside_signal=round(outside, 4),
        brain_fraction=span(m.brain_fraction for m in measures),
        landmarks_low=tuple(round(float(x), 4) for x in lm.min(0)),
        landmarks_high=tuple(round(float(x), 4) for x in lm.max(0)),
    )


def check_scan(
    m: ScanMeasures, record: TrainingRecord, margins: Margins = Margins()
) -> list[tuple[str, str]]:
    """(flag, reason) for each way the scan differs from the training scans; empty for
    a scan like them, and for a model without a record (record.scans == 0)."""
    if not record.scans:
        return []
    out = []
    if record.landmarks_low:
        out += _contrast(m, record, margins)
    lo, hi = record.brain_ml
    if not lo / margins.volume <= m.brain_ml <= hi * margins.volume:
        out.append(("brain_volume", f"brain {m.brain_ml:.0f} ml, training {lo:.0f}-{hi:.0f} ml"))
    lo, hi = record.extent_mm
    if not (lo / margins.extent <= m.extent_mm[0] and m.extent_mm[2] <= hi * margins.extent):
        out.append(
            (
                "brain_extent",
                f"brain box {_mm(m.extent_mm)} mm, training edges {lo:.0f}-{hi:.0f} mm",
            )
        )
    fill = record.brain_fraction[1] if record.brain_fraction else 1.0
    if m.outside_signal > record.outside_signal + margins.outside:
        out.append(
            (
                "skull_or_background",
                f"{m.outside_signal:.0%} of the voxels outside the brain mask carry signal "
                f"(training at most {record.outside_signal:.0%}): skull or background left in?",
            )
        )
    elif m.brain_fraction > min(fill * margins.fill, 0.95):
        out.append(
            (
                "skull_or_background",
                f"the brain (image > 0 without a mask) fills {m.brain_fraction:.0%} of the "
                f"field of view (training at most {fill:.0%}): skull or background noise left in?",
            )
        )
    if m.fov_mm[0] < record.extent_mm[0] / margins.extent:
        out.append(
            (
                "field_of_view",
                f"field of view {_mm(m.fov_mm)} mm, smaller than the smallest training brain "
                f"({record.extent_mm[0]:.0f} mm): the brain is cut",
            )
        )
    if record.voxel_mm and m.voxel_mm[2] > record.voxel_mm[1] * margins.voxel:
        out.append(
            (
                "resolution",
                f"voxels {_mm(m.voxel_mm)} mm, training at most {record.voxel_mm[1]:g} mm",
            )
        )
    return out


def _contrast(m: ScanMeasures, r: TrainingRecord, margins: Margins) -> list[tuple[str, str]]:
    """The landmarks between the 1st and 99th percentile (those two are 0 and 1 after
    the rescale) against their training ranges."""
    worst, where = 0.0, 0
    for i in range(1, len(m.landmarks) - 1):
        x, lo, hi = m.landmarks[i], r.landmarks_low[i], r.landmarks_high[i]
        excess = max(lo - x, x - hi, 0.0)
        if excess > worst:
            worst, where = excess, i
    if worst <= margins.landmark:
        return []
    from ..config import NYUL_PERCENTILES

    p = NYUL_PERCENTILES[where]
    return [
        (
            "contrast",
            f"intensity profile unlike the training scans' ({r.contrast or 'contrast unrecorded'}): "
            f"brain {p:g}th percentile {m.landmarks[where]:.2f}, training "
            f"{r.landmarks_low[where]:.2f}-{r.landmarks_high[where]:.2f}",
        )
    ]


def _mm(v: Sequence[float]) -> str:
    return "x".join(f"{x:.0f}" for x in v)


def qc_text(flags: Sequence[tuple[str, str]]) -> str:
    """The `qc` column of scores.csv: flag names joined by ';' (empty when clean)."""
    return ";".join(name for name, _ in flags)


def qc_reasons(flags: Sequence[tuple[str, str]]) -> str:
    """The flags with their reasons, for a warning or an error line."""
    return "; ".join(f"{name}: {why}" for name, why in flags)


class ScanWarning(UserWarning):
    """A scan unlike the model's training data (printed as one line by the CLI)."""


UNCHECKED = "no_training_record"  # the qc column of a scan that could not be checked
NO_RECORD = (
    "the model records nothing of its training data (made with maediff 0.9.0 or earlier): "
    f"the checks of contrast, brain volume and extent, skull or background and field of "
    f"view are skipped (qc column: {UNCHECKED})"
)


def scan_flags(
    subject: Subject, vol: PreparedVolume, record: TrainingRecord
) -> list[tuple[str, str]]:
    """check_scan of a loaded subject (nothing for a model without a record)."""
    if not record.scans:
        return []
    return check_scan(measure_subject(subject, vol), record)


def trained_on_text(r: TrainingRecord) -> str:
    """ "healthy T2w brain MRI", "synthetic T2w-like brains (maediff synth)", ...: what a
    model card says the model was trained on."""
    if not r.scans:
        return "healthy brain scans (the model records neither their contrast nor their measures)"
    if r.synthetic:
        return (
            f"synthetic {r.contrast or 'MRI'}-like brains of `maediff synth` (no scans of people)"
        )
    if r.contrast:
        return f"healthy {r.contrast} brain MRI"
    return "healthy brain MRI (contrast not recorded)"


def record_lines(r: TrainingRecord, landmarks: bool = False) -> list[str]:
    """The record in words (model cards, `maediff info`)."""
    if not r.scans:
        return [
            "- training data record: none (a model made with maediff 0.9.0 or earlier); "
            "detect's checks against the training data are skipped for it"
        ]

    def rng(v, fmt="{:.0f}") -> str:
        return f"{fmt.format(v[0])}-{fmt.format(v[1])}" if v else "?"

    lines = [
        f"- trained on: {r.scans} scans of {trained_on_text(r)}",
        f"- contrast: {r.contrast or 'not recorded'}; skull-stripped: {r.skull_stripped or 'unknown'}",
        f"- training scans: voxel edges {rng(r.voxel_mm, '{:g}')} mm, field of view "
        f"{rng(r.fov_mm)} mm, brain {rng(r.brain_ml)} ml, brain box edges {rng(r.extent_mm)} mm",
        f"- source: {r.source or 'not recorded'}",
    ]
    if landmarks and r.landmarks_low:
        lines.append(
            "- intensity landmarks (brain percentiles 1, 10, ..., 90, 99 after the rescale): "
            f"low {list(r.landmarks_low)}, high {list(r.landmarks_high)}"
        )
    return lines


def measure_subject(subject: Subject, vol: PreparedVolume) -> ScanMeasures:
    """measure_scan of a Subject whose prepared volume is `vol` (its image is the one
    `vol` was made from; the mask file, if any, is read again)."""
    image = vol.input_reference if vol.input_reference is not None else load_nifti(subject.image)
    mask = load_nifti(subject.mask, "brain mask") if subject.mask is not None else None
    return measure_scan(image, mask, vol)


__all__ = [
    "FLAGS",
    "NO_RECORD",
    "UNCHECKED",
    "Margins",
    "ScanWarning",
    "ScanMeasures",
    "check_scan",
    "measure_scan",
    "measure_subject",
    "qc_reasons",
    "qc_text",
    "scan_flags",
    "record_lines",
    "trained_on_text",
    "training_record",
]
