"""A training run's files: the training state for resuming (TrainState: counters,
optimizer moments, generator states) in a second safetensors file next to the weights
(`last.state.safetensors`), and the run folder's model card. The weights file itself,
loading and the identity of a model are maediff/weights.py (below training/: detection
and the evaluation use it); the names trainer.py and the command line import from here
are imported from there.

    save_weights(model, "run/best.safetensors", extra={"step": 1200})
    model = load_model("run/best.safetensors")        # or load_model("run")
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, describe
from ..weights import (
    CheckpointError,
    _atomic_save_file,
    _read,
    check_trained_overrides,
    load_model,
    load_saved_config,
    read_checkpoint,
    save_weights,
    saved_config,
    unwrap,
)

STATE_FORMAT = "maediff-train-state-v1"


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


__all__ = [
    # the training state and the run folder
    "RUN_FILES",
    "STATE_FORMAT",
    "TrainState",
    "cuda_rng_state",
    "model_card",
    "set_cuda_rng_state",
    # maediff/weights.py, imported here by the trainer and the command line
    "CheckpointError",
    "check_trained_overrides",
    "load_model",
    "load_saved_config",
    "read_checkpoint",
    "save_weights",
    "saved_config",
]
