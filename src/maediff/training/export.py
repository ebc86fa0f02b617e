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
settings (`check_calibration`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config
from ..evaluation.calibration import Calibration
from ..outputs import check_outputs
from .checkpoint import (
    FORMAT,
    CheckpointError,
    _atomic_save_file,
    config_sha256,
    model_card,
    read_checkpoint_metadata,
    weights_sha256,
)

# inference options that only change speed, not the maps (left out of the scoring settings)
SPEED_ONLY = ("batch_size", "amp", "seed", "channels_last", "compile")
EXPORT_FILES = (
    "- file: this one safetensors file holds the weights, the configuration, the training\n"
    "  data's description, the calibration (if any) and this card (its metadata); it loads\n"
    "  wherever `--model` takes a run folder: `maediff detect --model model.safetensors`."
)


def scoring_settings(cfg: Config) -> dict[str, Any]:
    """The settings that change the anomaly maps of a trained model: the test-time
    options `--set` may change (inference.*, diffusion.t_test, diffusion.sample_steps,
    data.standardise), less those that only change speed."""
    inf = {k: v for k, v in vars(cfg.inference).items() if k not in SPEED_ONLY}
    out: dict[str, Any] = {
        f"inference.{k}": list(v) if isinstance(v, tuple) else v for k, v in inf.items()
    }
    diffusion = dict(cfg.sections).get("diffusion")
    for key in ("t_test", "sample_steps"):
        if diffusion is not None and hasattr(diffusion, key):
            out[f"diffusion.{key}"] = getattr(diffusion, key)
    out["data.standardise"] = cfg.data.standardise
    return out


def model_identity(model: Any) -> dict[str, Any]:
    """name, model, weights_sha256 and config_sha256 of a model loaded from a file
    (load_model); a model built in memory (a baseline) has only its name."""
    info = getattr(model, "checkpoint_info", {}) or {}
    return dict(info.get("identity") or {"name": model.cfg.name, "model": model.cfg.model})


def check_calibration(cal: Calibration, model: Any, where: str = "the calibration") -> None:
    """Refuse a calibration made with other weights, another configuration or other
    scoring settings than `model` uses now (ValueError naming what differs)."""
    mine = model_identity(model)
    for key in ("weights_sha256", "config_sha256"):
        if cal.model.get(key) != mine.get(key):
            raise ValueError(
                f"{where} was made with another model ({key.split('_')[0]} "
                f"{str(cal.model.get(key))[:12]}, this model {str(mine.get(key))[:12]}); "
                "calibrate this model on healthy scans (`maediff calibrate`)"
            )
    now = scoring_settings(model.cfg)
    diff = sorted(k for k in set(now) | set(cal.scoring) if now.get(k) != cal.scoring.get(k))
    if diff:
        pairs = ", ".join(f"{k}: {cal.scoring.get(k)!r} there, {now.get(k)!r} now" for k in diff)
        raise ValueError(
            f"{where} was made with other scoring settings ({pairs}); use the same --set "
            "options, or calibrate again with these"
        )


def model_calibration(model: Any) -> Calibration | None:
    """The calibration an exported model file carries, else None."""
    text = (getattr(model, "checkpoint_info", {}) or {}).get("calibration")
    if not text:
        return None
    path = model.checkpoint_info.get("path", "the model file")
    try:
        return Calibration.from_json(json.loads(text), f"{path} (its calibration)")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its calibration is not valid JSON: {e}") from e


def read_calibration(path: str | Path) -> Calibration | None:
    """The calibration a model file carries, else None."""
    text = read_checkpoint_metadata(path)[3].get("calibration")
    if not text:
        return None
    try:
        return Calibration.from_json(json.loads(text), f"{path} (its calibration)")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its calibration is not valid JSON: {e}") from e


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
    from .checkpoint import resolve_checkpoint

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


def read_card(path: str | Path) -> str:
    """The model card a model file carries (an exported one), or the run's card."""
    cfg, _, extra, meta = read_checkpoint_metadata(path)
    return meta.get("model_card") or model_card(cfg, extra)


__all__ = [
    "check_calibration",
    "export_model",
    "model_calibration",
    "model_identity",
    "read_calibration",
    "read_card",
    "scoring_settings",
]
