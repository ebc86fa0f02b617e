"""Devices and mixed precision: the one place that knows about CUDA, MPS and bf16.

dev = resolve_device("auto")                 # CUDA, then MPS, then CPU
with autocast_context(dev, "auto"): ...      # bf16 where the hardware has it
"""

from __future__ import annotations

import contextlib

import torch


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


__all__ = ["autocast_context", "resolve_amp", "resolve_device"]
