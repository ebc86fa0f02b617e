"""A trained model as one file to pass on (docs/labelfree.md §Sharing a model).

    export_model("runs/mine", "model.safetensors", calibration="calib/")
    model = load_model("model.safetensors")      # as a run folder, wherever --model is taken

The file is a checkpoint (training/checkpoint.py: safetensors, the format version in
its `format` key) whose metadata also holds the maediff version that wrote it, the
training data's description, the calibration on healthy scans if any
(evaluation/calibration.py, JSON) and a model card (Markdown). A file of another
format version is refused with the version that wrote it.

A model's identity is the hash of its weights and of its configuration; a
calibration names the identity it was made with and the scoring settings (the
test-time options that change the maps), and is refused for any other model or
settings (pipeline/thresholds.py, `check_calibration`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import Config, TrainingRecord
from ..evaluation.calibration import Calibration
from ..outputs import apply_umask, check_outputs, temp_path
from ..weights import (
    FORMAT,
    CheckpointError,
    _atomic_save_file,
    config_sha256,
    read_checkpoint_metadata,
    scoring_settings,
    weights_sha256,
)
from .checkpoint import model_card

EXPORT_FILES = (
    "- file: this one safetensors file holds the weights, the configuration, the training\n"
    "  data's description, the calibration (if any) and this card (its metadata); it loads\n"
    "  wherever `--model` takes a run folder: `maediff detect --model model.safetensors`."
)


def calibration_section(cal: Calibration) -> list[str]:
    """The card's lines on a calibration."""
    lines = [
        "",
        "## Calibration on healthy scans",
        "",
        f"{cal.n_scans} healthy scans ({cal.source or 'unnamed'}), {cal.n_voxels:,} brain voxels;",
        "the threshold at a false-positive rate is the score that this share of their brain",
        "voxels exceeds (95 % interval: a bootstrap over scans):",
        "",
    ]
    lines += [f"- FPR {t.fpr:g}: {cal.describe(t.fpr)}" for t in cal.thresholds]
    lines += [f"- warning: {w}" for w in cal.warnings]
    return lines


def export_card(cfg: Config, extra: dict[str, Any], cal: Calibration | None) -> str:
    card = model_card(cfg, extra, files=EXPORT_FILES).rstrip("\n").split("\n")
    card += (
        calibration_section(cal)
        if cal is not None
        else [
            "",
            "No calibration: set thresholds on your own healthy scans with `maediff calibrate`.",
        ]
    )
    card += [
        "",
        "## Use",
        "",
        "    maediff calibrate --model model.safetensors -i healthy_scans/ -o calib/ --fpr 0.01 0.05",
        "    maediff detect --model model.safetensors -i scans/ -o maps/ --threshold-from calib/ --fpr 0.01",
        "",
        "A threshold holds for the scanner, protocol and preprocessing of the scans it was",
        "set on; calibrate again on healthy scans of your own.",
    ]
    return "\n".join(card) + "\n"


def export_model(
    run: str | Path,
    out: str | Path,
    calibration: str | Path | Calibration | None = None,
    which: str = "best",
    overwrite: bool = False,
) -> Path:
    """Write the `which` checkpoint of `run` (a run folder or a model file) as one
    self-describing file (module docstring). `calibration`: a calibration folder, file
    or record, checked against the weights; None keeps the one `run` carries, if any."""
    from ..weights import resolve_checkpoint

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the file to write, e.g. model.safetensors")
    # the output rule (outputs.py): an existing file, even an earlier export, is replaced
    # only with `overwrite` (a model file exported again in place included: it is read
    # whole before the new file is renamed over it)
    check_outputs(out.parent, "export", [out.name], overwrite, keep_own=True)
    src = resolve_checkpoint(run, which)
    cfg, tensors, extra, meta = read_checkpoint_metadata(src)
    cal = _calibration_for(calibration, meta, weights_sha256(tensors), config_sha256(cfg), src)
    metadata = {
        "format": FORMAT,
        "maediff_version": __version__,
        "kind": "maediff-model",
        "config": meta["config"],
        "extra": json.dumps(extra),
        "training_data": str(extra.get("data", "unknown")),
        "model_card": export_card(cfg, extra, cal),
    }
    if cal is not None:
        metadata["calibration"] = json.dumps(cal.to_json())
    return _atomic_save_file(tensors, out, metadata)


def _calibration_for(
    given: str | Path | Calibration | None,
    meta: dict[str, str],
    weights: str,
    config: str,
    src: Path,
) -> Calibration | None:
    if given is None:
        text = meta.get("calibration")
        return Calibration.from_json(json.loads(text), str(src)) if text else None
    cal = given if isinstance(given, Calibration) else Calibration.read(given)
    if cal.model.get("weights_sha256") != weights or cal.model.get("config_sha256") != config:
        raise ValueError(
            f"the calibration {given} was made with another model than {src} "
            "(weights or configuration differ); calibrate this model first"
        )
    return cal


def model_info(path: str | Path) -> str:
    """What `maediff info MODEL` prints: the file, its identity (the hashes that
    calibrations and detect's output folders check), what it was trained on (the record
    detect's checks compare scans with), its calibration and its card."""
    from ..data.qc import record_lines
    from ..weights import resolve_checkpoint

    src = resolve_checkpoint(path)
    cfg, tensors, extra, meta = read_checkpoint_metadata(src)
    lines = [
        f"# {src}",
        "",
        f"- written by maediff {meta.get('maediff_version', '?')} (format {meta.get('format')})",
        f"- weights sha256: {weights_sha256(tensors)}",
        f"- config sha256: {config_sha256(cfg)}",
        f"- scoring settings: {json.dumps(scoring_settings(cfg), sort_keys=True)}",
        "",
        "## Trained on",
        "",
        *record_lines(cfg.data.trained_on, landmarks=True),
        "",
        "## Calibration",
        "",
    ]
    text = meta.get("calibration")
    cal = Calibration.from_json(json.loads(text), str(src)) if text else None
    if cal is None:
        lines.append("none: set thresholds on healthy scans with `maediff calibrate`")
    else:
        lines += calibration_section(cal)[4:]
    card = meta.get("model_card") or model_card(cfg, extra)
    return "\n".join([*lines, "", "## Model card", "", card.rstrip("\n")]) + "\n"


def add_training_record(path: str | Path, out: str | Path, record: TrainingRecord) -> Path:
    """Write `path` (a model file made before the training record) to `out` with
    `record` in its configuration's data.trained_on, and the card and training-data
    description made again from it. The weights' bytes are copied as they are (only the
    file's JSON header changes), so the weights hash, the configuration hash
    (config_sha256 leaves the record out) and any calibration stay valid."""
    import struct

    src = Path(path)
    cfg, _, extra, meta = read_checkpoint_metadata(src)
    if cfg.data.trained_on.scans:
        raise ValueError(f"{src} already records what it was trained on")
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    config = json.loads(meta["config"])
    config["data"]["trained_on"] = to_dict_record(record)
    cfg = replace(cfg, data=replace(cfg.data, trained_on=record))
    text = meta.get("calibration")
    cal = Calibration.from_json(json.loads(text), str(src)) if text else None
    new_meta = {
        **meta,
        "config": json.dumps(config),
        "training_data": record.source or str(extra.get("data", "unknown")),
        "model_card": export_card(cfg, extra, cal),
    }
    header["__metadata__"] = new_meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start stays 8-byte aligned, as safetensors writes it
    tmp = temp_path(Path(out))  # the project's temporary name: a killed call's is cleaned
    try:
        tmp.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])
        apply_umask(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(out)


def to_dict_record(record: TrainingRecord) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(record).items()}


def recorded_contrast(path: str | Path) -> str:
    """The contrast (a BIDS suffix) a model file or run records of its training scans,
    "" when it records none; read from the file's metadata alone (no weights loaded)."""
    from safetensors import SafetensorError, safe_open

    from ..weights import resolve_checkpoint

    src = resolve_checkpoint(path)
    try:
        with safe_open(str(src), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {src} cannot be read: {e}") from e
    record = (config.get("data") or {}).get("trained_on") or {}
    return str(record.get("contrast") or "")


def read_card(path: str | Path) -> str:
    """The model card a model file carries (an exported one), or the run's card."""
    cfg, _, extra, meta = read_checkpoint_metadata(path)
    return meta.get("model_card") or model_card(cfg, extra)


__all__ = [
    "add_training_record",
    "model_info",
    "export_model",
    "read_card",
    "recorded_contrast",
]
