"""Self-describing checkpoints: safetensors weights with the resolved config as JSON
in the file's metadata. Loading never unpickles anything; writes are atomic.

    save_weights(model, "run/best.safetensors", extra={"step": 1200})
    model = load_model("run/best.safetensors")        # or load_model("run")

Training state for resuming (TrainState: counters, optimizer moments, generator
states) goes in a second safetensors file next to the weights (`last.state.safetensors`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import Config, apply_overrides, describe, from_dict, read_config_file, to_dict
from ..device import speed_up
from ..models import MODELS, build_model
from ..outputs import temp_path

FORMAT = "maediff-checkpoint-v1"
STATE_FORMAT = "maediff-train-state-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file named in the message."""


def _atomic_save_file(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )
        os.replace(tmp, path)
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
    from ..pretrained import SHIPPED, checkpoint_path

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
    Override it with `--set inference.clamp=false` for the new rule."""
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


# ------------------------------------------------------------------ training state


def cuda_rng_state(model: torch.nn.Module) -> torch.Tensor | None:
    """The CUDA generator state of the GPU the model is on (dropout and every draw
    without an explicit generator use it there), or None for a model off CUDA."""
    dev = _model_device(model)
    return torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None


def set_cuda_rng_state(model: torch.nn.Module, state: torch.Tensor) -> None:
    """Restore `cuda_rng_state` on the model's GPU; nothing for a model off CUDA (a GPU
    run resumed on the CPU draws from the CPU generators, which are restored anyway)."""
    dev = _model_device(model)
    if dev.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), dev)


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in (*unwrap(model).parameters(), *unwrap(model).buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class TrainState:
    """Where a training run stands: everything a resumed run restores besides the
    tensors (weights, optimizer moments, generator states), which travel with it in
    one atomically written safetensors file (`save` / `load`).

    The generators are the given CPU ones and, for a model on a GPU, that GPU's CUDA
    generator (`device_rng.cuda`; rank 0's under torchrun). A resumed run is exactly
    the uninterrupted one on the CPU only: on a GPU, cuDNN's autotuned kernels and
    atomic additions are not bit-reproducible, so it continues from the same state
    but drifts by float rounding."""

    step: int = 0
    epoch: int = 0
    phase: int = 0  # index into model.phases
    phase_step: int = 0  # steps taken in the current phase
    elapsed_s: float = 0.0
    best_val_loss: float = math.inf  # within the last phase
    last_train_loss: float = math.nan
    # the training loss smoothed within the phase (log.csv's train_loss): a resumed run
    # goes on from it (None before the first step, and in states written before 0.5.0,
    # whose resumed runs restart it)
    smoothed_train_loss: float | None = None

    def public(self) -> dict[str, Any]:
        """What goes into the weights' metadata and the model card."""
        best = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        return {"step": self.step, "epoch": self.epoch, "best_val_loss": best}

    def save(
        self,
        path: str | Path,
        model: torch.nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        generators: dict[str, torch.Generator],
        scaler_state: dict | None = None,
        ema: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        tensors: dict[str, torch.Tensor] = {
            f"model.{k}": v for k, v in unwrap(model).state_dict().items()
        }
        tensors.update({f"ema.{k}": v for k, v in (ema or {}).items()})
        groups, scalars = {}, {}
        for name, opt in optimizers.items():
            sd = opt.state_dict()
            groups[name] = sd["param_groups"]
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        tensors[f"opt.{name}.{pid}.{k}"] = v
                    else:
                        scalars.setdefault(name, {}).setdefault(str(pid), {})[k] = v
        for name, g in generators.items():
            tensors[f"rng.{name}"] = g.get_state()
        cuda_state = cuda_rng_state(model)
        if cuda_state is not None:
            tensors["device_rng.cuda"] = cuda_state
        numbers = {
            k: (v if not (isinstance(v, float) and not math.isfinite(v)) else str(v))
            for k, v in asdict(self).items()
        }
        meta = {
            "format": STATE_FORMAT,
            "param_groups": json.dumps(groups),
            "scalars": json.dumps(scalars),
            "state": json.dumps(numbers),
            "scaler": json.dumps(scaler_state or {}),
        }
        return _atomic_save_file(tensors, Path(path), meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: torch.nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        generators: dict[str, torch.Generator],
        ema: dict[str, torch.Tensor] | None = None,
    ) -> tuple[TrainState, dict]:
        """Restore model, optimizers, generators and the averaged weights (`ema`, when
        the run keeps them) in place; return (state, scaler state)."""
        path = Path(path)
        tensors, meta = _read(path, STATE_FORMAT)
        try:
            groups = json.loads(meta["param_groups"])
            scalars = json.loads(meta["scalars"])
            numbers = json.loads(meta["state"])
            scaler = json.loads(meta.get("scaler", "{}"))
            state = cls(**{k: float(v) if isinstance(v, str) else v for k, v in numbers.items()})
        except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"training state {path} has invalid metadata: {e}") from e
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            unwrap(model).load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(
                f"training state {path} does not fit this model: {str(e)[:300]}"
            ) from e
        if set(groups) != set(optimizers):
            raise CheckpointError(
                f"training state {path} has optimizers {sorted(groups)}, this model {sorted(optimizers)}"
            )
        for name, opt in optimizers.items():
            opt_state: dict[int, dict[str, Any]] = {}
            prefix = f"opt.{name}."
            for key, v in tensors.items():
                if key.startswith(prefix):
                    pid, k = key[len(prefix) :].split(".", 1)
                    opt_state.setdefault(int(pid), {})[k] = v
            for pid, d in scalars.get(name, {}).items():
                opt_state.setdefault(int(pid), {}).update(d)
            try:
                opt.load_state_dict({"state": opt_state, "param_groups": groups[name]})
            except (ValueError, KeyError) as e:
                raise CheckpointError(
                    f"training state {path} does not fit this model's optimizer {name!r}: {e}"
                ) from e
        if ema is not None:
            missing = [k for k in ema if f"ema.{k}" not in tensors]
            if missing:
                raise CheckpointError(
                    f"training state {path} holds no averaged weights for {missing[:3]} (train.ema_decay > 0)"
                )
            for k in ema:
                ema[k].copy_(tensors[f"ema.{k}"])
        for name, g in generators.items():
            if f"rng.{name}" not in tensors:
                raise CheckpointError(f"training state {path} has no state for generator {name!r}")
            g.set_state(tensors[f"rng.{name}"])
        if "device_rng.cuda" in tensors:
            set_cuda_rng_state(model, tensors["device_rng.cuda"])
        return state, scaler


RUN_FILES = (
    "- files: `best.safetensors` (lowest validation loss), `last.safetensors`, `config.yaml`;\n"
    "  the weights file carries its config, so `maediff detect --model best.safetensors` needs nothing else."
)


def model_card(cfg: Config, extra: dict[str, Any], files: str = RUN_FILES) -> str:
    """A short human-readable description written next to the weights (`files`: the
    line that says which files hold the model)."""
    from ..data.qc import record_lines, trained_on_text

    n_params = extra.get("parameters")
    lines = [
        f"# maediff model: {cfg.name} ({cfg.model})",
        "",
        f"{extra.get('description') or cfg.model}, trained on {trained_on_text(cfg.data.trained_on)} only;",
        "anomaly map = |x - reconstruction|.",
        "",
        f"- configuration: {describe(cfg)}",
        *record_lines(cfg.data.trained_on),
        f"- parameters: {n_params:,}" if isinstance(n_params, int) else "- parameters: unknown",
        f"- training data: {extra.get('data', 'unknown')}",
        f"- steps: {extra.get('step', '?')}, epochs: {extra.get('epoch', '?')}, best validation loss: {extra.get('best_val_loss', '?')}",
        f"- input: axial slices resized to {cfg.geometry.image_size}x{cfg.geometry.image_size}, intensities in [0, 1]",
        f"  (1st-99th percentile inside the brain mask), volumes on a {cfg.data.spacing:g} mm grid of {list(cfg.data.volume_shape)}",
        files,
        "",
        "Intended use: research on unsupervised anomaly detection. Not for clinical use.",
    ]
    return "\n".join(lines) + "\n"
