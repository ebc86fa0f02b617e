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

Outputs are never silently replaced (docs/reliability.md). A scan's files are written
under temporary names and renamed into place together; OUT/.maediff-detect.jsonl
records each scan's outputs and the settings they were made with (model, config,
threshold, seed), a line before the renames and one after. A later call skips the
scans it finished with the same settings, redoes those it was killed in the middle of,
and refuses, before any work and unless `overwrite`, to replace a file it did not write
or maps made with other settings (`--threshold` added to a finished folder included).
Two scans whose outputs would have the same name, or an output that would replace an
input, are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.bids import is_bids, write_description
from ..data.checks import input_checks
from ..data.datasets import load_subject, slices_to_volume, volume_to_slices
from ..data.io import DataError, Subject, save_like
from ..data.load import PreparedVolume
from ..data.qc import NO_RECORD, UNCHECKED, ScanWarning, qc_reasons, qc_text, scan_flags
from ..data.rawspace import RawSpace, raw_spaces
from ..evaluation.calibration import Calibration
from ..evaluation.postprocess import anomaly_scores, remove_small_components
from ..evaluation.protocol import EvalSettings
from ..outputs import check_outputs, clean_stale, inside, record_outputs, temp_path
from .scores import ScoresTable, scan_scores_of

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

    `model` is an AnomalyModel (models/base.py, the one contract): its
    `reconstruct(slices, generator, batch_size=, amp=, progress=, brain_mask=)`, where
    `progress(n)` reports n units of work done (whatever the model counts: the bar has
    no fixed total), `any_size` and its configuration's geometry and inference.
    """
    image = volume.image if isinstance(volume, PreparedVolume) else volume
    # a model that works at any size (Thresh) sees the volume's own slices
    size = image.shape[0] if model.any_size else model.cfg.geometry.image_size
    small = volume_to_slices(image, size)  # (Z, 1, size, size)
    skip = (
        model.cfg.inference.skip_empty_patches if skip_empty_patches is None else skip_empty_patches
    )
    brain, extra = None, {}
    if isinstance(volume, PreparedVolume):
        mask = (volume_to_slices(volume.brain_mask.astype(np.float32), size) > 0).float()
        brain = mask if skip else None
        if model.cfg.inference.patch_selection == "guided":
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


def anomaly_maps(
    model: AnomalyModel,
    vol: PreparedVolume,
    generator: torch.Generator,
    batch_size: int | None = None,
    amp: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reconstruction, |x - rec|, post-processed score map) of a prepared scan, (X, Y, Z)
    on the model grid: what `detect` writes and `calibrate` sets thresholds on."""
    rec = reconstruct_volume(model, vol, generator, batch_size, amp)
    residual = np.abs(vol.image - rec)
    post = EvalSettings()  # the protocol's post-processing (evaluation/postprocess.py)
    scores = anomaly_scores(residual, vol.brain_mask, post.erosion_iterations, post.median_size)
    return rec, residual, scores


def output_paths(out_dir: str | Path, name: str, bids: bool = False) -> dict[str, Path]:
    """Output files of one input, named after it. BIDS style: NAME_desc-anomalymap_T2w.nii.gz
    for an input NAME_T2w (the last entity is kept as the suffix). "qc" is the picture
    of `detect --qc` (NAME_qc.png)."""
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
        paths = {k: out / f"{stem}_desc-{v}_{suffix}.nii.gz" for k, v in desc.items()}
        return {**paths, "qc": out / f"{stem}_desc-qc_{suffix}.png"}
    paths = {k: out / f"{name}_{k}.nii.gz" for k in (*OUTPUTS, "prediction")}
    return {**paths, "qc": out / f"{name}_qc.png"}


@dataclass
class DetectReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # unusual inputs (data/checks.py)
    seconds: float = 0.0


def subject_outputs(out_dir: str | Path, subject: Subject, bids: bool = False) -> dict[str, Path]:
    """output_paths for one subject; a BIDS subject's files go to its own folder
    (OUT/sub-01/ses-1/anat/) and always have BIDS names."""
    if subject.folder is not None:
        return output_paths(Path(out_dir) / subject.folder, subject.name, bids=True)
    return output_paths(out_dir, subject.name, bids)


MANIFEST = ".maediff-detect.jsonl"  # in the output folder: what detect wrote, and how


class DetectLog:
    """OUT/.maediff-detect.jsonl: one JSON line per scan before its outputs are renamed
    into place ("writing") and one after ("done"), each with the outputs (relative to
    OUT) and the settings they were made with; the last line of a scan counts."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self.path = self.root / MANIFEST

    def key(self, paths: dict[str, Path]) -> str:
        return paths["anomaly"].relative_to(self.root).as_posix()

    def read(self) -> dict[str, dict]:
        """key -> the last record of that scan's outputs."""
        if not self.path.exists():
            return {}
        records = {}
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
                records[r["key"]] = r
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill: that scan is redone
        return records

    def append(self, paths: dict[str, Path], state: str, settings: dict) -> None:
        entry = {
            "key": self.key(paths),
            "state": state,
            "outputs": sorted(p.relative_to(self.root).as_posix() for p in paths.values()),
            "settings": settings,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # less the umask
        try:  # one write of one line: whole or, after a kill, cut and ignored
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)


def detect_settings(
    model: AnomalyModel, threshold: float | None, seed: int, amp: str | None = None
) -> dict:
    """What the maps of a detect call depend on: the model by its content (the SHA-256
    of its weights and of its configuration, as a calibration names it: not the file's
    path, so a copy of the file, or the file exported from the run, is the same model),
    the scoring settings (the test-time options that change maps: maediff/weights.py),
    the threshold, the seed and the autocast."""
    from ..weights import model_identity, scoring_settings

    try:
        ident = model_identity(model)
        text = json.dumps(scoring_settings(model.cfg), sort_keys=True, default=str)
        scoring = hashlib.sha256(text.encode()).hexdigest()[:16]
    except (AttributeError, TypeError):  # a duck-typed model without a Config
        ident, scoring = {}, None
    return {
        "weights": ident.get("weights_sha256"),
        "config": ident.get("config_sha256"),
        "scoring": scoring,
        "threshold": threshold,
        "seed": seed,
        "amp": amp,
    }


def detect_subject(
    model: AnomalyModel,
    subject: Subject,
    out_dir: str | Path,
    generator: torch.Generator,
    threshold: float | None = None,
    bids: bool = False,
    batch_size: int | None = None,
    amp: str | None = None,
    scan_record: dict | None = None,
    calibration: Calibration | None = None,
    threshold_source: str | None = None,
    log: DetectLog | None = None,
    settings: dict | None = None,
    strict: bool = False,
    qc: bool = False,
    raw: RawSpace | None = None,
) -> dict[str, Path]:
    """One scan -> anomaly map (raw |x - rec|), post-processed score map, reconstruction
    and, with a threshold, a binary prediction; all in the input file's voxel grid.
    Every file is written under a temporary name first and all are renamed into place
    together, between a "writing" and a "done" line of `log`. `scan_record`, when
    given, receives the scan's scalar scores (pipeline/scores.py) and its `qc` flags.

    Before the scan is scored it is compared with the model's training data
    (data/qc.py): a scan unlike them is mapped with a warning that names it and its
    flags, or, `strict`, refused (DataError) with nothing written. `raw`: the maps go
    on the grid of the raw scan that `maediff preprocess` made this one from
    (data/rawspace.py)."""
    vol = load_subject(subject, model.cfg.data)
    flags = scan_flags(subject, vol, model.cfg.data.trained_on)
    if flags and strict:
        raise DataError(f"{subject.image}: {qc_reasons(flags)}; refused (--strict)")
    if flags:
        warnings.warn(f"{subject.image}: {qc_reasons(flags)}", ScanWarning, stacklevel=2)
    rec, residual, scores = anomaly_maps(model, vol, generator, batch_size, amp)
    post = EvalSettings()  # the protocol's post-processing (evaluation/postprocess.py)
    if scan_record is not None:
        scan_record.update(scan_scores_of(vol, scores, threshold, calibration))
        # the input's own flags (detect_files, data/checks.py) first, then these
        own = qc_text(flags) if model.cfg.data.trained_on.scans else UNCHECKED
        scan_record["qc"] = ";".join(f for f in (scan_record.get("qc", ""), own) if f)
    maps = {"anomaly": residual, "score": scores, "reconstruction": rec}
    paths = _wanted(subject_outputs(out_dir, subject, bids), threshold, qc)
    reference = raw.reference if raw is not None else vol.input_reference

    def back(data: np.ndarray, labels: bool = False) -> np.ndarray:
        if raw is not None:
            return raw.resample(vol, data, labels)
        return vol.to_input_space(data, labels)

    staged: dict[Path, Path] = {}  # final path -> its temporary file
    try:
        if qc:  # the picture to check by eye (reporting/scan_qc.py), on the model grid
            staged[paths["qc"]] = _qc_picture(
                vol, rec, scores, threshold, subject, scan_record, flags, paths["qc"]
            )
        for key, data in maps.items():
            staged[paths[key]] = save_like(back(data), reference, temp_path(paths[key], ".nii.gz"))
        if threshold is not None:
            pred = remove_small_components(scores > threshold, post.min_component)
            staged[paths["prediction"]] = save_like(
                back(pred.astype(np.float32), labels=True) > 0.5,
                reference,
                temp_path(paths["prediction"], ".nii.gz"),
                dtype=np.uint8,
            )
        if subject.folder is not None:  # BIDS derivatives: a sidecar naming the source scan
            niftis = {k: p for k, p in paths.items() if k != "qc"}
            staged.update(_stage_sidecars(subject, niftis, threshold, threshold_source))
        if log is not None:  # the output rule's record (outputs.py), then the scan's own
            record_outputs(log.root, "detect", [p.relative_to(log.root).as_posix() for p in staged])
            log.append(paths, "writing", settings or {})
        for final, tmp in staged.items():
            os.replace(tmp, final)
        if log is not None:
            log.append(paths, "done", settings or {})
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return paths


def _qc_picture(
    vol: PreparedVolume,
    rec: np.ndarray,
    scores: np.ndarray,
    threshold: float | None,
    subject: Subject,
    scan_record: dict | None,
    flags: list[tuple[str, str]],
    final: Path,
) -> Path:
    """The scan's QC picture, drawn to its temporary name."""
    from ..reporting.scan_qc import figure_scan_qc

    post = EvalSettings()
    pred = (
        remove_small_components(scores > threshold, post.min_component)
        if threshold is not None
        else None
    )
    score = (scan_record or {}).get("anomaly_score")
    title = subject.name + (f": anomaly score {score:.4g}" if isinstance(score, float) else "")
    title += f"; checks: {qc_text(flags) or 'no flag'}"
    tmp = temp_path(final, ".png")
    figure_scan_qc(vol.image, rec, scores, pred, vol.brain_mask, title, tmp)
    return tmp


def _stage_sidecars(
    subject: Subject,
    paths: dict[str, Path],
    threshold: float | None,
    threshold_source: str | None = None,
) -> dict[Path, Path]:
    """The JSON sidecar of each BIDS output, written to its temporary name."""
    source = f"bids:raw:{subject.folder}/{subject.image.name}"
    staged = {}
    for key, path in paths.items():
        sidecar = {"Sources": [source], "Description": SIDECAR_TEXT[key]}
        if key == "prediction":
            sidecar["Threshold"] = threshold
            if threshold_source:
                sidecar["ThresholdSource"] = threshold_source
        side = path.with_name(path.name.removesuffix(".nii.gz").removesuffix(".nii") + ".json")
        tmp = temp_path(side)
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
        staged[side] = tmp
    return staged


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
    calibration: Calibration | None = None,
    threshold_source: str | None = None,
    input_root: str | Path | None = None,
    strict: bool = False,
    qc: bool = False,
    raw_space: str | Path | None = None,
) -> DetectReport:
    """Run detection on many scans; a bad file is reported and skipped, not fatal.
    bids_source: the BIDS data set the subjects come from; `out_dir` then becomes a
    derivatives data set (dataset_description.json, the input's sub-*/ses-*/anat
    folders, BIDS names). Each scan's scalar scores go to OUT/scores.csv (scores.tsv
    for BIDS output; pipeline/scores.py), written after every scan; `calibration` adds
    each scan's percentile among its healthy scans, `threshold_source` says how the
    threshold was set.

    Before any work: outputs of two scans with one name, or an output that is an
    input, are refused (DataError); so are, unless `overwrite`, files this call would
    replace that detect did not write, or wrote with other settings. Scans finished
    with the same settings and with their scores row are skipped; scans a killed call
    left half-renamed are redone.

    `raw_space`: the raw scans that `maediff preprocess` made the subjects from; the
    maps go on their grids (each subject's NAME_to_raw.tfm; all checked up front).

    `qc`: one picture per scan beside its maps (NAME_qc.png: reporting/scan_qc.py) and
    OUT/index.html, the page that shows them all.

    Each scan is first compared with what the model was trained on (data/qc.py): its
    flags go to the `qc` column with a warning naming the scan; `strict` refuses it.
    A model without that record (made with maediff 0.9.0 or earlier) is said so once,
    and its scans carry the flag `no_training_record`."""
    check_detect_arguments(out_dir, threshold, batch_size)
    raws = raw_spaces(subjects, raw_space) if raw_space is not None else {}
    if qc and not overwrite:
        _check_index(Path(out_dir))
    if not model.cfg.data.trained_on.scans:
        if strict:
            raise ValueError(f"--strict checks scans against the training data, and {NO_RECORD}")
        warnings.warn(NO_RECORD, ScanWarning, stacklevel=2)
    report = DetectReport()
    start = time.perf_counter()
    wanted = [(s, _wanted(subject_outputs(out_dir, s, bids), threshold, qc)) for s in subjects]
    check_distinct(wanted, out_dir)
    log = DetectLog(out_dir)
    table_files = _table_files(bids or bids_source is not None) + (["index.html"] if qc else [])
    # the scores table is detect's when the record says so, or when the folder holds
    # detect's record of maps (a folder of a version before the output record)
    check_outputs(out_dir, "detect", table_files, overwrite, adopt=log.path.exists())
    settings = {**detect_settings(model, threshold, seed, amp), "raw_space": bool(raws)}
    todo = set(range(len(wanted))) if overwrite else _to_do(wanted, log, settings)
    if bids_source is not None:  # a BIDS input: the outputs form a derivatives data set
        _check_description(Path(out_dir), overwrite)
        write_description(out_dir, bids_source)
    table = ScoresTable.open(out_dir, bids=bids or bids_source is not None)
    for folder in {p.parent for _, paths in wanted for p in paths.values()}:
        clean_stale(folder)  # temporary files of a killed call
    for i, s in enumerate(tqdm(subjects, desc="detecting", unit="scan", disable=not progress)):
        # a call without a threshold leaves a scan made with one as it is (maps and row)
        scored = table.current(s.name, threshold) or (threshold is None and s.name in table.rows)
        if i not in todo and scored:
            report.skipped.append(s.name)
            continue
        g = torch.Generator().manual_seed(seed)
        checks = scan_checks(s)  # unusual but valid input: a warning and a QC flag
        report.warnings += [text for _, text in checks]
        record: dict = {"qc": ";".join(flag for flag, _ in checks)}
        try:
            detect_subject(
                model, s, out_dir, g, threshold, bids, batch_size, amp,
                scan_record=record, calibration=calibration,
                threshold_source=threshold_source, log=log, settings=settings,
                strict=strict, qc=qc, raw=raws.get(s.name),
            )  # fmt: skip
            report.written.append(s.name)
        except (DataError, ValueError, RuntimeError) as e:
            report.failed.append((str(s.image), str(e)))
            continue
        table.put(s, record, threshold, threshold_source, input_root)
        record_outputs(out_dir, "detect", table_files)  # once; before the table is written
        table.write()
    if qc:  # OUT/index.html: every scan's picture, with its scores and flags
        from ..reporting.scan_qc import write_qc_index

        pictures = {s.name: paths["qc"] for s, paths in wanted}
        write_qc_index(out_dir, list(table.rows.values()), pictures)
    report.seconds = time.perf_counter() - start
    return report


def _table_files(bids: bool) -> list[str]:
    return ["scores.tsv", "scores.json"] if bids else ["scores.csv"]


def scan_checks(subject: Subject) -> list[tuple[str, str]]:
    """(QC flag, warning) of a scan's unusual properties (data/checks.py), from its
    headers and mask; a file that cannot be read gets none here and fails where the
    scan is loaded, with its own message."""
    try:
        image = nib.load(str(subject.image))
        mask = nib.load(str(subject.mask)) if subject.mask is not None else None
        return input_checks(image, mask, subject.image)
    except Exception:  # noqa: BLE001 - reported by load_subject, named there
        return []


def _wanted(paths: dict[str, Path], threshold: float | None, qc: bool = False) -> dict[str, Path]:
    """The outputs a call writes: the prediction with a threshold, the picture with qc."""
    drop = {*(() if threshold is not None else ("prediction",)), *(() if qc else ("qc",))}
    return {k: p for k, p in paths.items() if k not in drop}


def check_distinct(
    wanted: list[tuple[Subject, dict[str, Path]]], out_dir: str | Path | None = None
) -> None:
    """No two scans (a scan listed twice included) share an output, no output is one
    of the inputs, leaves `out_dir`, or lands in a folder that holds an input scan (a
    later `detect -i` of that folder would read the maps as scans)."""
    owner: dict[Path, Subject] = {}
    for s, paths in wanted:
        for p in paths.values():
            if out_dir is not None and not inside(out_dir, p):
                raise DataError(f"output {p} of scan {s.image} would be written outside {out_dir}")
            first = owner.setdefault(p.resolve(), s)
            if first is not s:
                raise DataError(
                    f"scans {first.image} and {s.image} would write the same output {p}; "
                    "give them distinct names (a 'name' column in a CSV list)"
                )
    for s, _ in wanted:
        for p in (s.image, s.mask, s.seg):
            if p is not None and p.resolve() in owner:
                raise DataError(
                    f"output {p} of scan {owner[p.resolve()].image} would replace an input "
                    "file of the same name; choose another output folder"
                )
    scan_dirs = {s.image.parent.resolve(): s for s, _ in wanted}
    for _, paths in wanted:
        for p in paths.values():
            if p.parent.resolve() in scan_dirs:
                raise DataError(
                    f"output folder {p.parent} holds the input scan "
                    f"{scan_dirs[p.parent.resolve()].image}: a later call would read the maps "
                    "as scans; choose another output folder"
                )


def _to_do(
    wanted: list[tuple[Subject, dict[str, Path]]], log: DetectLog, settings: dict
) -> set[int]:
    """The indices of the scans to compute (without overwrite); refuses to replace
    what is not ours."""
    records = log.read()
    todo: set[int] = set()
    conflicts = []
    for i, (_, paths) in enumerate(wanted):
        rec = records.get(log.key(paths))
        present = [p for p in paths.values() if p.exists()]
        if rec is None:  # nothing recorded: existing files are someone else's
            if not present:
                todo.add(i)
            elif len(present) < len(paths):
                conflicts.append(f"{present[0]} exists and was not written by maediff detect")
            # every output present, none recorded: a folder of an earlier version, skipped
        elif rec["state"] != "done":
            todo.add(i)  # a call killed while renaming: its own files, redone
        elif "weights" not in (rec.get("settings") or {}):
            conflicts.append(
                f"{paths['anomaly']} was made by maediff 0.9.0 or earlier, which named the "
                "model by its path, not its weights"
            )
        elif changed := _changed(rec.get("settings") or {}, settings):
            conflicts.append(
                f"{paths['anomaly']} was made with other settings (was, now): {changed}"
            )
        elif len(present) < len(paths):
            todo.add(i)  # ours, with these settings, and a file since removed
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise DataError(
            f"{log.root}: {conflicts[0]}{more}; pass --overwrite to replace, or choose "
            "another output folder"
        )
    return todo


def _changed(made: dict, now: dict) -> dict:
    """Settings of this call that differ from those the existing maps were made with;
    a call without a threshold leaves an existing prediction as it is."""
    keys = [k for k in now if k != "threshold" or now[k] is not None]
    return {k: (made.get(k), now[k]) for k in keys if made.get(k) != now[k]}


QC_TITLE = "maediff detect: one picture per scan"  # reporting/scan_qc.py: write_qc_index


def _check_index(out: Path) -> None:
    """An index.html in `out` that detect --qc did not write is not replaced."""
    page = out / "index.html"
    if page.exists() and QC_TITLE not in page.read_text(errors="replace"):
        raise DataError(
            f"{page} exists and was not written by maediff detect --qc; pass --overwrite to "
            "replace it, or choose another output folder"
        )


def _check_description(out: Path, overwrite: bool) -> None:
    """A derivatives data set of another tool in `out` is not taken over."""
    path = out / "dataset_description.json"
    if overwrite or not path.exists():
        return
    try:
        generated = json.loads(path.read_text()).get("GeneratedBy", [])
        ours = any(g.get("Name") == "maediff" for g in generated)
    except (json.JSONDecodeError, AttributeError, TypeError):
        ours = False
    if not ours:
        raise DataError(
            f"{path} describes a data set not made by maediff; pass --overwrite to replace "
            "it, or choose another output folder (e.g. derivatives/maediff)"
        )


def check_output_folder(inputs: str | Path, out_dir: str | Path) -> None:
    """Outputs never go where a later call would read them as scans: not into the input
    folder itself, and, for a BIDS data set, only under its derivatives/."""
    i, o = Path(inputs).resolve(), Path(out_dir).resolve()
    if is_bids(i):
        if (o == i or i in o.parents) and (i / "derivatives") not in (o, *o.parents):
            raise DataError(
                f"output folder {out_dir} is inside the BIDS data set {inputs} but not in its "
                f"derivatives/: its files would be read as scans; use {Path(inputs) / 'derivatives' / 'maediff'}"
            )
    elif i.is_dir() and o == i:
        raise DataError(
            f"output folder {out_dir} is the input folder: a later call would read the maps "
            f"as scans; choose another folder, e.g. {Path(inputs) / 'maediff'}"
        )


__all__ = [
    "DetectLog",
    "DetectReport",
    "anomaly_maps",
    "check_output_folder",
    "check_detect_arguments",
    "detect_files",
    "detect_subject",
    "output_paths",
    "reconstruct_volume",
    "subject_outputs",
]
