"""A model's file: safetensors weights with the resolved config as JSON in the file's
metadata. Loading never unpickles anything; writes are atomic. What detection, the
evaluation and its worker processes need of a trained model, below training/ (which
adds the training state and the run folder: training/checkpoint.py) and the
pipeline.

    save_weights(model, "run/best.safetensors", extra={"step": 1200})
    model = load_model("run/best.safetensors")        # or load_model("run")
    model_identity(model), scoring_settings(model.cfg)  # what a calibration names

A model's identity is the hash of its weights and of its configuration; its scoring
settings are the test-time options that change its maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import Config, apply_overrides, from_dict, read_config_file, to_dict
from .device import speed_up
from .models import MODELS, build_model
from .outputs import apply_umask, temp_path

FORMAT = "maediff-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file named in the message."""


def _atomic_save_file(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> Path:
    """Write through a temporary name and one rename, with the user's umask (safetensors
    makes its files 0600); a full or read-only disk is one error naming `path`."""
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )
        apply_umask(tmp)
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e).replace(str(tmp), "").strip(" :'\"")
        raise OSError(f"cannot write {path}: {reason}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read(path: Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupted or not a safetensors file: {e}"
        ) from e
    if meta.get("format") != expected_format:
        _refuse_other_version(path, meta, expected_format)
        raise CheckpointError(
            f"checkpoint {path} is not a maediff file (format {meta.get('format')!r}, expected {expected_format!r})"
        )
    return tensors, meta


def _refuse_other_version(path: Path, meta: dict[str, str], expected: str) -> None:
    """A maediff file of another format version (`NAME-vN`): say which maediff wrote it."""
    found = re.fullmatch(r"(.+)-v(\d+)", meta.get("format") or "")
    base = re.fullmatch(r"(.+)-v(\d+)", expected)
    if found and base and found.group(1) == base.group(1):
        writer = meta.get("maediff_version", "an unknown version")
        raise CheckpointError(
            f"{path} was written by maediff {writer} in format version {found.group(2)}; "
            f"this maediff {__version__} reads version {base.group(2)}: use a maediff that "
            "reads it, or export the model again with this one"
        )


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of the weights alone (names, dtypes, shapes, values in name order): the same
    for a run's checkpoint and the file `maediff export` makes of it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_sha256(cfg: Config) -> str:
    """Hash of the resolved configuration (canonical JSON), less `data.trained_on`: the
    record of the training data describes the model and changes no map, and leaving it
    out keeps the hash (and the calibrations) of models made before it."""
    data = to_dict(cfg)
    data["data"].pop("trained_on", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def save_weights(
    model: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Weights + resolved config (JSON) + `extra` (JSON) in one safetensors file."""
    m = unwrap(model)
    meta = {
        "format": FORMAT,
        "maediff_version": __version__,
        "config": json.dumps(to_dict(m.cfg)),
        "extra": json.dumps(extra or {}),
    }
    return _atomic_save_file(m.state_dict(), Path(path), meta)


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A run folder -> its `which` checkpoint (best, else last); a file -> itself; the
    name of a model that ships with the package (`maediff-cpu`), where no file or folder
    of that name exists -> its file (maediff.pretrained)."""
    from .pretrained import SHIPPED, checkpoint_path

    p = Path(path)
    if str(path) in SHIPPED and not p.exists():
        return checkpoint_path(str(path))
    if p.is_dir():
        for name in (f"{which}.safetensors", "best.safetensors", "last.safetensors"):
            if (p / name).exists():
                return p / name
        raise CheckpointError(
            f"run folder {p} holds no checkpoint (best.safetensors or last.safetensors)"
        )
    return p


def saved_config(data: Any) -> Config:
    """A configuration a run saved (its checkpoints' metadata, its config.yaml), read
    with the rules of the release that wrote it, so that an old run reconstructs its own
    maps: a key it lacks whose default has changed since takes its release's value.

    `inference.clamp` (0.5.0): before it, every model that declares
    `clamped_before_0_5` (all but the diffusion models) clamped its reconstruction to
    [0, 1]; a saved configuration without the key is older, and those models clamp.
    Override it with `--set inference.clamp=false` for the new rule. (An old "no
    epoch limit", a large train.epochs, reads as null: config.py from_dict.)"""
    inference = data.get("inference") if isinstance(data, dict) else None
    if isinstance(inference, dict) and "clamp" not in inference:
        cls = MODELS.get(data.get("model", Config().model))
        if cls is not None:
            clamp = cls.clamped_before_0_5
            data = {**data, "inference": {**inference, "clamp": clamp}}
    return from_dict(data)


def load_saved_config(path: str | Path) -> Config:
    """A run's config.yaml, with the rules of the release that wrote it (saved_config)."""
    data = read_config_file(path)
    try:
        return saved_config(data or {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def read_checkpoint(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    cfg, tensors, extra, _ = read_checkpoint_metadata(path)
    return cfg, tensors, extra


def read_checkpoint_metadata(
    path: str | Path,
) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """read_checkpoint, and the file's metadata as stored (an exported model's card and
    calibration are there: training/export.py)."""
    path = resolve_checkpoint(path)
    tensors, meta = _read(path, FORMAT)
    try:
        cfg = saved_config(json.loads(meta["config"]))
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {e}") from e
    if not isinstance(extra, dict):
        raise CheckpointError(
            f"checkpoint {path}: its metadata 'extra' is {type(extra).__name__}, not a JSON object"
        )
    return cfg, tensors, extra, meta


def check_weights(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The file's tensors are the model's, of its shapes, and finite: a diverged run's
    NaN weights would give NaN maps; a file whose config does not describe its weights
    (edited, or missing a section) is named with the first tensors that differ."""
    want = model.state_dict()
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its config ({model.cfg.model}): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    shapes = [
        f"{k} {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in want.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise CheckpointError(
            f"checkpoint {path} does not match its config ({model.cfg.model}): "
            f"{len(shapes)} tensor(s) differ in shape, e.g. {shapes[0]}"
        )
    dtypes = [
        f"{k} {tensors[k].dtype} in the file, {v.dtype} in the model"
        for k, v in want.items()
        if tensors[k].dtype != v.dtype
    ]
    if dtypes:  # load_state_dict would cast int32 to float32 without a word
        raise CheckpointError(
            f"checkpoint {path} does not match its config ({model.cfg.model}): "
            f"{len(dtypes)} tensor(s) differ in type, e.g. {dtypes[0]}"
        )
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or Inf weights in {len(bad)} tensor(s), e.g. "
            f"{bad[0]!r}: the training diverged; use an earlier checkpoint or train again"
        )


def check_trained_overrides(model: str, overrides: Sequence[str]) -> None:
    """Refuse an override a trained `model` cannot take: inference.*, data.standardise
    and the keys its class declares (AnomalyModel.trained_options) may change; the rest
    is fixed by the weights or the training."""
    cls = MODELS.get(model)
    keys = ("data.standardise", *(cls.trained_options if cls is not None else ()))
    bad = [
        o
        for o in overrides
        if not o.startswith("inference.") and o.split("=")[0].strip() not in keys
    ]
    if bad:
        raise ValueError(
            f"only inference.*, {', '.join(keys)} can be changed for a trained {model} model, "
            f"not {bad}"
        )


def load_model(path: str | Path, device: str | torch.device = "cpu", overrides: Sequence[str] = ()):
    """Build the registered model of a checkpoint file or run folder, weights loaded,
    in eval mode, with `overrides` ("inference.batch_size=16", ...) applied to its
    config and the inference speed settings (inference.channels_last / compile)."""
    path = resolve_checkpoint(path)
    cfg, tensors, extra, meta = read_checkpoint_metadata(path)
    identity = {
        "name": cfg.name,
        "model": cfg.model,
        "weights_sha256": weights_sha256(tensors),
        "config_sha256": config_sha256(cfg),
    }
    if overrides:
        check_trained_overrides(cfg.model, overrides)
        cfg = apply_overrides(cfg, list(overrides))
    model = build_model(cfg)
    check_weights(path, model, tensors)
    model.load_state_dict(tensors)
    device = torch.device(device)
    model = model.to(device).eval()
    model.checkpoint_info = {
        "path": str(path),
        **extra,
        "identity": identity,
        "calibration": meta.get("calibration"),  # JSON text in an exported model, else None
        "speed": speed_up(model, device, cfg.inference.channels_last, cfg.inference.compile),
    }
    return model


# ------------------------------------------------------------------ identity

# inference options that only change speed, not the maps (left out of the scoring settings)
SPEED_ONLY = ("batch_size", "amp", "seed", "channels_last", "compile")


def scoring_settings(cfg: Config) -> dict[str, Any]:
    """The settings that change the anomaly maps of a trained model: the test-time
    options `--set` may change (inference.*, diffusion.t_test, diffusion.sample_steps,
    data.standardise), less those that only change speed."""
    inf = {k: v for k, v in vars(cfg.inference).items() if k not in SPEED_ONLY}
    out: dict[str, Any] = {
        f"inference.{k}": list(v) if isinstance(v, tuple) else v for k, v in inf.items()
    }
    for key in MODELS[cfg.model].trained_options:  # the model's own (diffusion.t_test, ...)
        section, name = key.split(".")
        out[key] = getattr(cfg.section(section), name)
    out["data.standardise"] = cfg.data.standardise
    return out


def model_identity(model: Any) -> dict[str, Any]:
    """name, model, weights_sha256 and config_sha256 of a model loaded from a file
    (load_model); a model built in memory (a baseline) has only its name."""
    return dict(
        model.checkpoint_info.get("identity") or {"name": model.cfg.name, "model": model.cfg.model}
    )
