"""What every model of the registry provides, so that one trainer, one checkpoint
format, `detect` and `evaluate` serve them all (the contract, in one place).

    model = build_model(cfg)                       # cfg.model picks the class
    loss = model(batch, generator, group="model")  # training objective (DDP calls forward)
    rec = model.reconstruct(slices, generator)     # (S, 1, H, W) in [0, 1] -> same shape

`reconstruct` is the one reconstruction driver of every model: it checks the input,
resolves device, autocast and batch size, runs without autograd, keeps the input in
slices without brain (`brain_mask`), and treats the range the same way for all models
(`inference.clamp`). A model writes only its procedure, `reconstruct_slices(x, run)`,
using `run.batches(...)` (batching and progress) and `run.autocast()`; a one-pass model
writes only `reconstruct_batch(x)`.

A model trains in one or more phases (f-AnoGAN: the WGAN, then the encoder). Each
phase takes a share of the training budget and cycles through optimizer groups, one
group per step (WGAN-GP: five critic steps, one generator step). Batches are slices
(B, 1, H, W) or, for models that see whole volumes (SVAE), (B, S, 1, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

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
    # config keys a trained model of this class may change when it is loaded (--set of
    # detect, evaluate and calibrate), beyond inference.* and data.standardise, which
    # every model takes: what reconstruction reads and the weights do not fix
    trained_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # where the weights came from and the speed settings applied (load_model fills it;
        # the evaluation records it)
        self.checkpoint_info: dict[str, Any] = {}

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

    draws_noise: ClassVar[bool] = False  # True: reconstruct takes `noise` (diffusion models)

    def reconstruct(
        self,
        slices: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        batch_size: int | None = None,
        amp: str | None = None,
        progress: Callable[[int], None] | None = None,
        brain_mask: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        """Healthy reconstruction of the slices of one volume: (S, 1, H, W) in [0, 1] ->
        the same shape, on the model's device. The one driver of every model:

        - `batch_size` (default inference.batch_size) inputs per forward pass and `amp`
          (default inference.amp) autocast reach the model's procedure as `run`;
          `progress(n)` reports n more units of work done (slices, or (slice, patch)
          pairs for patch models);
        - `brain_mask` (S, 1, H, W): a slice without brain keeps the input, for every
          model (a procedure may also skip the work there: `run.has_brain`, and patch
          models skip patches without brain);
        - the range: with inference.clamp the result is clamped to [0, 1], for every
          model; without it (the default, as pDDPM's evaluation) it is the model's
          output as it is.

        `options` go to the procedure (MAEDiff: `guide_mask`)."""
        self.check_images(slices)
        if slices.dim() != 4:
            raise ValueError(
                f"reconstruct takes the slices of one volume (S, 1, H, W), got {tuple(slices.shape)}"
            )
        if noise is not None and not self.draws_noise:
            raise ValueError(
                f"{self.registry_name} draws no noise at reconstruction; pass noise=None"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if brain_mask is not None and tuple(brain_mask.shape) != tuple(slices.shape):
            raise ValueError(
                f"brain_mask must have the shape of the slices {tuple(slices.shape)}, got {tuple(brain_mask.shape)}"
            )
        dev = self.device
        run = Reconstruction(
            device=dev,
            amp=resolve_amp(amp or self.cfg.inference.amp, dev),
            batch_size=batch_size or self.cfg.inference.batch_size,
            progress=progress,
            generator=generator,
            noise=noise,
            brain=None if brain_mask is None else brain_mask.to(dev, torch.float32),
            slices=slices.shape[0],
        )
        x = slices.to(dev, torch.float32)
        with torch.no_grad():
            rec = self.reconstruct_slices(x, run, **options).float()
            self.check_output(rec, x, "reconstruct_slices")
            if run.brain is not None and not bool(run.has_brain.all()):
                rec = torch.where(run.has_brain[:, None, None, None], rec, x)
        if not bool(torch.isfinite(rec).all()):
            n = int((~torch.isfinite(rec)).sum())
            raise ValueError(
                f"the reconstruction of model {self.registry_name!r} holds {n} NaN or Inf "
                f"values (inference.amp={run.amp}; non-finite weights or an overflow)"
            )
        return rec.clamp(0, 1) if self.cfg.inference.clamp else rec

    def check_output(self, out: Tensor, x: Tensor, method: str) -> None:
        """The model contract (this module, docs/plugins.md): `method` returns a tensor
        of its input's shape."""
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"model {self.registry_name!r} ({type(self).__name__}) breaks the model contract "
                f"(docs/plugins.md): {method} returned {got} for an input of shape "
                f"{tuple(x.shape)}; it must return the input's shape"
            )

    def reconstruct_slices(self, x: Tensor, run: Reconstruction) -> Tensor:
        """The model's procedure: (S, 1, H, W) float32 on the device, in [0, 1] -> its
        reconstruction. This default serves one-pass models: `reconstruct_batch` on
        `run.batch_size` slices at a time under autocast, slices without brain skipped;
        models with their own procedure (Alg. 2, a sequence over slices) override it."""
        out = x.clone()
        todo = torch.nonzero(run.has_brain).flatten()
        for idx in run.batches(todo):
            with run.autocast():
                rec = self.reconstruct_batch(x[idx])
            self.check_output(rec, x[idx], "reconstruct_batch")
            out[idx] = rec.float()
        return out

    def reconstruct_batch(self, x: Tensor) -> Tensor:
        """One-pass models: (B, 1, H, W) in [0, 1] -> their reconstructions."""
        raise NotImplementedError(
            f"{type(self).__name__} defines neither reconstruct_slices nor reconstruct_batch"
        )

    def compile_targets(self) -> list[nn.Module]:
        """The networks whose forward `torch.compile` replaces (device.speed_up): by
        default every child module holding parameters. Never the model itself: its
        forward is the training loss (random draws, rolls, dropout with a generator),
        and reconstruction does not call it. A model whose networks are called through
        other methods (encode / decode) names the modules those call."""
        return [m for m in self.children() if any(True for _ in m.parameters())]

    # ------------------------------------------------------------------ test-time noise level
    # A diffusion model reconstructs from noise level t_test (its configuration holds
    # it); the evaluation records it and `evaluate --choose-t` chooses it on validation.
    # Models without one keep these defaults; the shared layers ask only these.

    @property
    def timesteps(self) -> int | None:
        """T, the length of the diffusion; None: not a diffusion model."""
        return None

    @property
    def t_test(self) -> int | None:
        """The noise level reconstruction starts from; None: the model has none."""
        return None

    def t_test_range(self) -> tuple[int, int] | None:
        """(lowest, highest) t_test the model can reconstruct from; None: none to choose."""
        return None

    def set_t_test(self, t: int) -> None:
        """Reconstruct at t_test = t from now on (the weights stay; in place)."""
        raise ValueError(f"model {self.registry_name!r} has no t_test to set")

    # ------------------------------------------------------------------ declared capabilities
    # What the shared layers (the benchmark, benchmark/probe.py, checkpoints) ask of a
    # model, so that none of them names one.

    # a run saved before `inference.clamp` existed (0.5.0) clamped its reconstruction
    # to [0, 1] (training/checkpoint.py: saved_config)
    clamped_before_0_5: ClassVar[bool] = True
    # the patch probe of benchmark/probe.py measures it: the model has the probe hooks
    # below and, as patch diffusion models do, `noise(n, generator)`, `grid` (PatchGrid),
    # `timesteps` and `t_test`
    patch_probe: ClassVar[bool] = False

    @classmethod
    def update_budget_text(cls, cfg: Config) -> str:
        """The training budget of `cfg` in updates (cfg.train.max_steps > 0), as the
        benchmark's budget table says it. A model with several parts (f-AnoGAN) says how
        its updates are shared."""
        unit = "volumes" if cls.input_kind == "volumes" else "slices"
        return f"{cfg.train.max_steps} updates of {cfg.train.batch_size} {unit}"

    def probe_inputs(self, slices: Tensor) -> Tensor:
        """Probe hook: slices (B, 1, H, W) in [0, 1] -> the model's input range."""
        raise NotImplementedError(f"{type(self).__name__} has no patch probe")

    def probe_l1(self, x: Tensor, t: Tensor, noise: Tensor, k: Tensor, brain: Tensor) -> Tensor:
        """Probe hook: x (B, 1, H, W) in the model's range noised to t (B,) with `noise`
        inside patch k (B,), the x0 prediction's l1 over the brain pixels (brain (B, 1,
        H, W)) of the patch, in image units: (B,) on the CPU."""
        raise NotImplementedError(f"{type(self).__name__} has no patch probe")

    @property
    def has_probe_branch(self) -> bool:
        """True: `probe_branch` reads a branch whose input dependence the probe measures."""
        return False

    def probe_branch(
        self, x: Tensor, t: Tensor, noise: Tensor, k: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Probe hook: the feature map f and the branch output o added to it, for x (B,
        1, H, W) in the model's range noised to t with `noise` inside patch k; None
        without a branch."""
        return None

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


@dataclass
class Reconstruction:
    """What one `reconstruct` call gives the model's procedure."""

    device: torch.device
    amp: str  # resolved: "none", "bf16" or "fp16"
    batch_size: int
    progress: Callable[[int], None] | None
    generator: torch.Generator | None
    noise: Tensor | None  # given noise fields (diffusion models), else None: draw them
    brain: Tensor | None  # (S, 1, H, W) float on the device, or None
    slices: int  # S

    def autocast(self):
        return autocast_context(self.device, self.amp)

    @cached_property
    def has_brain(self) -> Tensor:
        """(S,) bool on the device: slices holding brain (all, without a brain mask);
        computed once per call, for the driver and the procedure."""
        if self.brain is None:
            return torch.ones(self.slices, dtype=torch.bool, device=self.device)
        return self.brain.flatten(1).amax(1) > 0

    def batches(self, items: int | Tensor) -> Iterator[slice | Tensor]:
        """`items` (a count, or a 1-d index tensor) in chunks of batch_size; after each
        chunk's work (when the loop asks for the next) `progress` hears its size."""
        chunks = (
            batched(items, self.batch_size)
            if isinstance(items, int)
            else list(items.split(self.batch_size))
        )
        for c in chunks:
            yield c
            if self.progress is not None:
                self.progress(c.stop - c.start if isinstance(c, slice) else len(c))


__all__ = [
    "AnomalyModel",
    "OptimizerGroup",
    "Phase",
    "Reconstruction",
    "batched",
    "count_parameters",
]
