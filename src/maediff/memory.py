"""Memory: what the machine has free, and what training a configuration needs.

Training checks its estimate before the first step (`check_training_memory`), so that
a preset too large for the machine stops with the numbers and a batch size that fits,
instead of being killed by the kernel (or the GPU driver) minutes later:

    need = weights + gradients + optimizer moments + averaged weights
           + autocast's weight copies + DDP's gradient buckets (under torchrun)
           + activations per sample x batch size (+ what does not grow with the batch)

The activations are measured, not tabled: one forward pass of the model's training
loss on one sample, on the training device and under its autocast, counts the bytes
autograd keeps for the backward pass (`saved_tensors_hooks`), taken as the cost of each
sample of the batch. The estimate leaves out transient buffers of the
backward pass and the allocator's fragmentation, so the check refuses only above what
is free and warns above WARN_FRACTION of it. MAEDIFF_NO_MEMORY_CHECK=1 skips it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import to_dict

if TYPE_CHECKING:
    import torch

WARN_FRACTION = 0.8  # warn when the estimate exceeds this share of the free memory
SKIP_ENV = "MAEDIFF_NO_MEMORY_CHECK"
GIB = 2**30


def host_memory_available() -> int | None:
    """Bytes the kernel can give a process now (MemAvailable of /proc/meminfo), or None
    where that file does not exist (not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_memory_available(device: torch.device) -> int | None:
    """Free bytes of the device: torch.cuda.mem_get_info on a GPU, MemAvailable on the
    CPU, None where neither says (MPS)."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return host_memory_available()
    return None


@dataclass(frozen=True)
class TrainingMemory:
    """An estimate of the memory one training process needs, in bytes."""

    weights: int
    gradients: int
    optimizer: int  # Adam's two moments per trainable weight
    average: int  # the exponential moving average of the weights (train.ema_decay > 0)
    per_sample: int  # activations kept for the backward pass, per sample of a batch
    batch_size: int
    weight_copies: int = 0  # autocast's low-precision copies of the weights, once a step
    ddp_buckets: int = 0  # DistributedDataParallel's gradient buckets (under torchrun)

    @property
    def fixed(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.average
            + self.weight_copies
            + self.ddp_buckets
        )

    def total(self, batch_size: int | None = None) -> int:
        return self.fixed + self.per_sample * (batch_size or self.batch_size)

    def largest_batch(self, free: int) -> int:
        """The largest batch whose estimate stays under WARN_FRACTION of `free` (0: none)."""
        room = WARN_FRACTION * free - self.fixed
        return max(0, int(room // max(self.per_sample, 1)))

    def describe(self) -> str:
        return (
            f"about {size_text(self.total())} at batch size {self.batch_size} (weights, "
            f"gradients, optimizer and average {size_text(self.fixed)}, "
            f"activations {size_text(self.per_sample * self.batch_size)})"
        )


def size_text(n: float) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_activation_bytes(model: torch.nn.Module, batch: torch.Tensor, group: str) -> int:
    """Bytes autograd keeps from one forward pass of `model.loss` on `batch` (each
    storage once; the weights themselves, and autocast's copies of them, not)."""
    return saved_bytes(model, batch, group)[0]


def saved_bytes(model: torch.nn.Module, batch: torch.Tensor, group: str) -> tuple[int, int]:
    """(activations, weight copies): the bytes autograd keeps from one forward pass of
    `model.loss` on `batch`, each storage once, the weights themselves not. Weight
    copies are what autocast casts the weights to (bf16 copies of the fp32 weights,
    cached for the step): a weight's values in another dtype. They are made
    once per step whatever the batch, so they are no cost per sample (at the paper scale
    in bf16 they are 0.2 GB; counted per sample of a batch of 32, 6 GB)."""
    import torch

    params = list(model.parameters())
    own = {p.untyped_storage().data_ptr() for p in params}
    by_size: dict[int, list[torch.Tensor]] = {}
    for p in params:
        by_size.setdefault(p.numel(), []).append(p)
    acts: dict[int, int] = {}
    copies: dict[int, int] = {}

    def is_copy(t: torch.Tensor) -> bool:
        """Whether t's storage holds a weight's values in another dtype (saved as a view,
        a linear layer's transposed weight, say)."""
        with torch.no_grad():
            whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
            return any(
                p.dtype != t.dtype and torch.equal(p.detach().flatten().to(t.dtype), whole)
                for p in by_size.get(whole.numel(), ())
            )

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in own and ptr not in acts and ptr not in copies:
            (copies if is_copy(t) else acts)[ptr] = s.nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(batch, gen, group=group)
    del loss
    return sum(acts.values()), sum(copies.values())


# activations per sample and autocast's weight copies, by model configuration and device
_MEASURED: dict[str, tuple[int, int]] = {}


def estimate_training_memory(
    model, cfg, device: torch.device, batch_size: int, world: int = 1
) -> TrainingMemory:
    """The estimate for training `model` (on `device`, in training mode) with batches of
    `batch_size` per process, `world` processes under torchrun. Activations: one forward
    pass of every optimizer group's loss on one sample, the largest counted, taken as
    the cost of each sample (an upper bound: it includes what does not grow with the
    batch), autocast's weight copies apart, once; measured once per configuration and
    device in a process. Under torchrun DistributedDataParallel holds the gradients a
    second time, in its all-reduce buckets. The model's buffers (BatchNorm statistics)
    and the random generators are left as they were."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = _bytes(model.parameters()) + _bytes(model.buffers())
    grads = _bytes(trainable)
    key = json.dumps(
        {**to_dict(cfg), "name": "", "train": cfg.train.amp, "inference": None, "dev": str(device)}
    )
    if key not in _MEASURED:
        _MEASURED[key] = _measure_per_sample(model, cfg, device)
    per_sample, copies = _MEASURED[key]
    return TrainingMemory(
        weights=weights,
        gradients=grads,
        optimizer=2 * grads,
        average=weights if cfg.train.ema_decay > 0 else 0,
        per_sample=per_sample,
        batch_size=batch_size,
        weight_copies=copies,
        ddp_buckets=grads if world > 1 else 0,
    )


def _measure_per_sample(model, cfg, device: torch.device) -> tuple[int, int]:
    import torch

    from .device import autocast_context

    H = cfg.geometry.image_size
    shape = (1, H, H) if model.input_kind != "volumes" else (cfg.data.volume_shape[2], 1, H, H)
    x = torch.rand((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    used, copies = 0, 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for g in model.optimizer_groups():
                with autocast_context(device, cfg.train.amp):
                    a, c = saved_bytes(model, x, g)
                used, copies = max(used, a), max(copies, c)
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.zero_grad(set_to_none=True)
    return used, copies


def check_training_memory(
    model, cfg, device: torch.device, batch_size: int, world: int = 1
) -> TrainingMemory | None:
    """Refuse (ValueError) a training that needs more memory than the device has free,
    warn above WARN_FRACTION of it; both say the estimate and the
    `--set train.batch_size=N` that fits. Returns the estimate (None: not checked,
    MAEDIFF_NO_MEMORY_CHECK=1 or no free-memory figure for the device)."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return None
    # the weights are on the device already: they count in the estimate, not as used
    free = device_memory_available(device)
    if free is None:
        return None
    free += _bytes(model.parameters()) + _bytes(model.buffers())
    est = estimate_training_memory(model, cfg, device, batch_size, world)
    need = est.total()
    if need <= WARN_FRACTION * free:
        return est
    fit = est.largest_batch(free)
    advice = (
        f"--set train.batch_size={fit} would fit (about {size_text(est.total(fit))})"
        if fit >= 1
        else "even batch size 1 does not fit: use a smaller preset (MODEL-cpu) or a larger device"
    )
    text = (
        f"training {cfg.name} ({cfg.model}) on {device} needs {est.describe()}; "
        f"{size_text(free)} are free there"
    )
    if need > free:
        raise ValueError(f"{text}: {advice} ({SKIP_ENV}=1 trains anyway)")
    warnings.warn(f"{text}, little room left: {advice}", RuntimeWarning, stacklevel=2)
    return est


__all__ = [
    "TrainingMemory",
    "check_training_memory",
    "device_memory_available",
    "estimate_training_memory",
    "host_memory_available",
    "saved_activation_bytes",
    "saved_bytes",
]
