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
  used and a warning says why; running out of memory is not a compilation failure and
  is raised.
- bf16 ("auto"): on CUDA only where the GPU computes it natively (compute capability
  8.0, Ampere, and later); older GPUs emulate it, slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import torch
from torch import nn

from .config import SPEED_MODES


def resolve_device(
    name: str = "auto", local_rank: int = 0, distributed: bool = False
) -> torch.device:
    """ "auto" picks CUDA, then MPS, then CPU; an explicit device must be available.

    CUDA without an index takes GPU `local_rank`. Under torchrun (`distributed`) every
    process takes its own GPU, cuda:LOCAL_RANK, whatever index was given: "cuda:0" for
    every rank would put them all on GPU 0 (a warning says so when an index conflicts)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps") from e
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but MPS is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    elif dev.type == "cuda" and distributed and dev.index != local_rank:
        warnings.warn(
            f"device {name!r} under torchrun: process LOCAL_RANK={local_rank} takes "
            f"cuda:{local_rank} (one GPU per process); limit the GPUs with CUDA_VISIBLE_DEVICES",
            RuntimeWarning,
            stacklevel=2,
        )
        dev = torch.device("cuda", local_rank)
    return dev


def cuda_bf16_native(device: torch.device | None = None) -> bool:
    """Whether the GPU computes bf16 natively (compute capability >= 8.0).
    torch.cuda.is_bf16_supported() alone also counts bf16 emulated in fp32 on older
    GPUs, which is slower than plain fp32."""
    check = torch.cuda.is_bf16_supported
    if "including_emulation" in inspect.signature(check).parameters:  # torch >= 2.4
        return bool(check(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp(amp: str, device: torch.device) -> str:
    """ "auto": bf16 where the hardware computes it natively (CUDA GPUs of compute
    capability 8.0 and later, CPUs with AVX512-BF16 or AMX), otherwise "none". Other
    values pass through."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if cuda_bf16_native(device) else "none"
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


# errors of the run itself, not of compilation: raised, never a reason to run eager
_NOT_COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)


def compile_with_fallback(module: nn.Module, backend: str = "inductor") -> None:
    """Replace `module.forward` by its torch.compile'd version, falling back to eager
    (once, with a warning) when compilation fails. State-dict keys are unchanged.
    Out of memory (and KeyboardInterrupt, SystemExit) propagate: the eager forward would
    not fit either, and a warning would hide why the run stopped. `backend`: torch.compile's
    ("aot_eager" compiles the graphs without generating kernels, as the tests do)."""
    eager = module.forward
    compiled = torch.compile(eager, backend=backend)
    failed: list[str] = []

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except _NOT_COMPILE_ERRORS:
                raise
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
        # an AnomalyModel names its targets; any other module is compiled whole
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
    "cuda_bf16_native",
    "resolve_amp",
    "resolve_device",
    "speed_up",
]
