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
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from ..evaluation.calibration import Calibration
from ..weights import (
    FORMAT,
    _atomic_save_file,
    config_sha256,
    read_checkpoint_metadata,
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
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; use --overwrite to replace it")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the file to write, e.g. model.safetensors")
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


def read_card(path: str | Path) -> str:
    """The model card a model file carries (an exported one), or the run's card."""
    cfg, _, extra, meta = read_checkpoint_metadata(path)
    return meta.get("model_card") or model_card(cfg, extra)


__all__ = [
    "export_model",
    "read_card",
]
