"""Devices and mixed precision: the one place that knows about CUDA, MPS and bf16.

dev = resolve_device("auto")                 # CUDA, then MPS, then CPU
with autocast_context(dev, "auto"): ...      # bf16 where the hardware has it
notes = speed_up(model, dev, channels_last="auto", compile="auto", training=False)

Speed settings (docs/method.md §Speed): each is "on", "off" or "auto", and "auto"
decides per device for a reason measured on that kind of device:
- channels_last (NHWC weights and activations): on for CUDA (tensor-core convolutions
  want NHWC); on the CPU for inference (+4 % per volume, measured with oneDNN) and off
  for training (-4 % per step, measured).
- compile (torch.compile of the networks' forward): on for CUDA; off on the CPU, where
  it took 2 minutes to compile for 5 % per pass (measured at the cpu preset). When
  compilation fails (no C++ compiler, an unsupported platform) the eager forward is
  used and a warning says why.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from .config import SPEED_MODES


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but MPS is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def resolve_amp(amp: str, device: torch.device) -> str:
    """ "auto": bf16 where the hardware computes it natively (CUDA with bf16 support, CPUs
    with AVX512-BF16 or AMX), otherwise "none". Other values pass through."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        native = any(
            getattr(cpu, f, lambda: False)()
            for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
        return "bf16" if native else "none"
    return "none"


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for "bf16" / "fp16" ("auto" resolved first); a no-op for "none"."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r} must be 'none', 'bf16' or 'fp16'")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _decide(setting: str, name: str, auto: bool, reason: str) -> tuple[bool, str]:
    if setting not in SPEED_MODES:
        raise ValueError(f"{name}={setting!r} must be one of {', '.join(SPEED_MODES)}")
    if setting == "auto":
        return auto, f"{name} {'on' if auto else 'off'} (auto: {reason})"
    return setting == "on", f"{name} {setting} (set)"


def compile_with_fallback(module: nn.Module) -> None:
    """Replace `module.forward` by its torch.compile'd version, falling back to eager
    (once, with a warning) when compilation fails. State-dict keys are unchanged."""
    eager = module.forward
    compiled = torch.compile(eager)
    failed: list[str] = []

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # compilation errors come in many types
                failed.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                warnings.warn(
                    f"torch.compile failed for {type(module).__name__} ({failed[0]}); "
                    "running the eager forward",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return eager(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def speed_up(
    model: nn.Module,
    device: torch.device,
    channels_last: str = "auto",
    compile: str = "auto",
    training: bool = False,
) -> list[str]:
    """Apply the speed settings to `model` (in place) and return one line per setting
    saying what was decided and why. Models list the submodules worth compiling in
    `compile_targets` (default: the model itself)."""
    cuda = device.type == "cuda"
    cl, cl_note = _decide(
        channels_last,
        "channels_last",
        cuda or (device.type == "cpu" and not training),
        "CUDA" if cuda else f"{device.type}, {'training' if training else 'inference'}",
    )
    comp, comp_note = _decide(compile, "compile", cuda, "CUDA" if cuda else device.type)
    if cl:
        model.to(memory_format=torch.channels_last)
    if comp:
        for m in getattr(model, "compile_targets", lambda: [model])():
            compile_with_fallback(m)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return [cl_note, comp_note]


__all__ = [
    "autocast_context",
    "compile_with_fallback",
    "resolve_amp",
    "resolve_device",
    "speed_up",
]
