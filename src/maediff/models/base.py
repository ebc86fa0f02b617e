"""What every model of the registry provides, so that one trainer, one checkpoint
format, `detect` and `evaluate` serve them all (the contract, in one place).

    model = build_model(cfg)                       # cfg.model picks the class
    loss = model(batch, generator, group="model")  # training objective (DDP calls forward)
    rec = model.reconstruct(slices, generator)     # (S, 1, H, W) in [0, 1] -> same

A model trains in one or more phases (f-AnoGAN: the WGAN, then the encoder). Each
phase takes a share of the training budget and cycles through optimizer groups, one
group per step (WGAN-GP: five critic steps, one generator step). Batches are slices
(B, 1, H, W) or, for models that see whole volumes (SVAE), (B, S, 1, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import Config
from ..device import autocast_context, resolve_amp


@dataclass(frozen=True)
class Phase:
    name: str
    fraction: float  # share of the training budget (steps, epochs or minutes)
    groups: tuple[str, ...] = ("model",)  # optimizer groups, one per step, cycled


@dataclass
class OptimizerGroup:
    params: list[nn.Parameter]
    lr: float | None = None  # None: train.lr
    betas: tuple[float, float] | None = None  # None: the optimizer's default


class AnomalyModel(nn.Module):
    """Base class: a plain nn.Module with a loss per optimizer group and a reconstruction."""

    registry_name: ClassVar[str] = ""  # set by @register_model
    input_kind: ClassVar[str] = "slices"  # or "volumes"
    trainable: ClassVar[bool] = True
    any_size: ClassVar[bool] = False  # True: reconstructs slices of any size (no resizing)
    description: ClassVar[str] = ""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    # ------------------------------------------------------------------ training contract

    @property
    def phases(self) -> tuple[Phase, ...]:
        return (Phase("train", 1.0),)

    def optimizer_groups(self) -> dict[str, OptimizerGroup]:
        return {"model": OptimizerGroup([p for p in self.parameters() if p.requires_grad])}

    def enter_phase(self, phase: Phase) -> None:
        """Called by the trainer when a phase starts (or resumes): freeze what it keeps fixed."""

    def loss(
        self, x0: Tensor, generator: torch.Generator | None = None, group: str = "model"
    ) -> Tensor:
        raise NotImplementedError

    def validation_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The loss that selects the best checkpoint (in the last phase)."""
        return self.loss(x0, generator, group=self.phases[-1].groups[-1])

    def forward(
        self, x0: Tensor, generator: torch.Generator | None = None, group: str = "model"
    ) -> Tensor:
        """The training objective, so that DistributedDataParallel can wrap the model."""
        return self.loss(x0, generator, group=group)

    # ------------------------------------------------------------------ inference contract

    def reconstruct(
        self,
        slices: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        batch_size: int | None = None,
        amp: str | None = None,
        progress: Callable[[int], None] | None = None,
        brain_mask: Tensor | None = None,
    ) -> Tensor:
        """Healthy reconstruction of the slices of one volume: (S, 1, H, W) in [0, 1] -> same.
        `progress(n)` reports n more units of work done (slices, or (slice, patch) pairs
        for patch models); `brain_mask` (S, 1, H, W) lets a model skip empty regions.

        The default serves one-pass models: `reconstruct_batch` on `batch_size` slices at
        a time under autocast; models with their own procedure (Alg. 2, a sequence over
        slices) override this method."""
        self.check_images(slices)
        if noise is not None:
            raise ValueError(
                f"{self.registry_name} draws no noise at reconstruction; pass noise=None"
            )
        dev = self.device
        amp = resolve_amp(amp or self.cfg.inference.amp, dev)
        parts = [torch.zeros((0, *slices.shape[1:]), device=dev)]
        with torch.no_grad():
            for b in batched(slices.shape[0], batch_size or self.cfg.inference.batch_size):
                with autocast_context(dev, amp):
                    rec = self.reconstruct_batch(slices[b].to(dev, torch.float32))
                parts.append(rec.float().clamp(0, 1))
                if progress is not None:
                    progress(b.stop - b.start)
        return torch.cat(parts)

    def reconstruct_batch(self, x: Tensor) -> Tensor:
        """One-pass models: (B, 1, H, W) in [0, 1] -> their reconstructions."""
        raise NotImplementedError(
            f"{type(self).__name__} defines neither reconstruct nor reconstruct_batch"
        )

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def check_images(self, x: Tensor) -> None:
        """(B, 1, H, W) at the configured size, finite; volumes (B, S, 1, H, W) likewise.

        Finiteness is not checked in a training step on an accelerator (autograd on,
        tensor off the CPU): the check would make the host wait for the device at every
        step, the inputs were checked when loaded (data/io.py) and a non-finite input
        makes the loss non-finite, which the trainer stops at. Reconstruction and
        validation (no autograd) and everything on the CPU keep the check."""
        H = self.cfg.geometry.image_size
        lead = 5 if self.input_kind == "volumes" and x.dim() == 5 else 4
        if x.dim() != lead or x.shape[-3] != 1 or tuple(x.shape[-2:]) != (H, H):
            shape = "(B, S, 1, {0}, {0})" if lead == 5 else "(B, 1, {0}, {0})"
            raise ValueError(f"expected images of shape {shape.format(H)}, got {tuple(x.shape)}")
        if x.device.type != "cpu" and torch.is_grad_enabled():
            return
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def batched(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


__all__ = ["AnomalyModel", "OptimizerGroup", "Phase", "batched", "count_parameters"]
