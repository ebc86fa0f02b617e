"""The scales: one function each, applied to any model's configuration on top of its
preset. `paper` (the published sizes), `cpu` (trains in minutes on 2 cores, the same
number of updates of every reconstructing part) and `tiny` (unit tests). A scale sets
the shared sections here; each model section scales itself where it is declared
(`register_section(..., cpu=..., tiny=...)`). Presets (config.get_preset) apply them.

    cfg = with_update_budget(get_preset("dae-cpu"), 1000)   # 1000 updates of each part
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .registry import SECTIONS, model_spec

if TYPE_CHECKING:
    from .config import Config, GeometryConfig


def _rescale_geometry(g: GeometryConfig, size: int, grid: int) -> GeometryConfig:
    """The same partition (patch and stride as fractions of the slice) at `size` pixels."""

    def scaled(v: int) -> int:
        return max(grid, round(v * size / g.image_size / grid) * grid)

    return replace(
        g, image_size=size, patch_size=scaled(g.patch_size), stride=scaled(g.stride), grid_size=grid
    )


# The `cpu` scale's training budget in steps: the same model on every machine (the
# demo and `benchmark --scale cpu`). Chosen from measurements of quality per CPU-minute
# on 2 fp32 cores (docs/history/0.3.0.md, "How the cpu scale was chosen").
CPU_STEPS = 300


def with_update_budget(cfg: Config, updates: int) -> Config:
    """The step budget that gives each part producing the reconstruction `updates`
    optimizer updates (docs/baselines.md §Budgets): the unit every model of a table
    shares. One step updates one part; most models have one part, so steps = updates;
    a model with several (f-AnoGAN) says how in its spec's `update_budget`."""
    if updates < 1:
        raise ValueError(f"the update budget must be >= 1, got {updates}")
    t = replace(cfg.train, max_steps=updates, max_minutes=0.0, epochs=None)
    cfg = replace(cfg, train=t)
    spec = model_spec(cfg.model)
    return spec.update_budget(cfg, updates) if spec.update_budget else cfg


def _scale_sections(cfg: Config, scale: str) -> Config:
    """Each of the model's own sections as the scale makes it (its register_section)."""
    new = {}
    for k, v in cfg.sections:
        fn = SECTIONS[k].scales.get(scale)
        new[k] = fn(v) if fn is not None else v
    return replace(cfg, **new)


def _cpu_scale(cfg: Config) -> Config:
    """The paper's structure (K=16, N=36, global attention at H/2 and H/4, the MAE) at
    48x48 with narrow networks: a demo in about 12 minutes on 2 fp32 cores. The shared
    sections are scaled here: 48x48 slices, Adam at 1e-3 with warm-up, cosine decay over
    the step budget and an EMA of the weights; each model section scales itself (the
    U-Net's widths: models/unet.py)."""
    cfg = replace(
        cfg,
        geometry=_rescale_geometry(cfg.geometry, 48, 8),
        train=replace(
            cfg.train,
            lr=1e-3,
            schedule="cosine",
            warmup_steps=30,
            ema_decay=0.995,
            epochs=None,
            max_steps=CPU_STEPS,
            max_minutes=0.0,
            amp="auto",
            val_every=10,
        ),
        inference=replace(cfg.inference, batch_size=32, amp="auto"),
    )
    # the same number of updates of every reconstructing part, for every model
    return with_update_budget(_scale_sections(cfg, "cpu"), CPU_STEPS)


def _tiny_scale(cfg: Config) -> Config:
    """Smallest useful configuration: unit tests, the end-to-end tests and a benchmark
    that fits a slow laptop. The diffusion schedule stays the paper's (T = 1000,
    t_test = 500): a shorter schedule with the same betas hardly noises the input
    (alpha_bar(10) = 0.95 at T = 20), and the diffusion models then reconstruct the
    lesions too."""
    cfg = replace(
        cfg,
        geometry=_rescale_geometry(cfg.geometry, 32, 8),
        train=replace(cfg.train, lr=1e-3, batch_size=8, epochs=2),
        data=replace(cfg.data, volume_shape=(32, 32, 8), spacing=6.0),
        inference=replace(cfg.inference, batch_size=64),
    )
    return _scale_sections(cfg, "tiny")


# The paper scale's validation and checkpoints (docs/method.md §Training): its epoch is
# ~12 steps, about a second on a current GPU, and its files large (best: 0.4 GB, last +
# state: 1.6 GB for MAEDiff), so by steps and minutes rather than every epoch
PAPER_VAL_EVERY_STEPS = 500
PAPER_CHECKPOINT_EVERY_MINUTES = 10.0


def _paper_scale(cfg: Config) -> Config:
    """The published sizes (the defaults), validating every PAPER_VAL_EVERY_STEPS steps
    and checkpointing every PAPER_CHECKPOINT_EVERY_MINUTES minutes; training and
    inference in bf16 autocast on a CUDA GPU that computes it natively ("cuda-bf16":
    1.5-2x the speed of TF32 there; docs/method.md §Speed), fp32 on any other device,
    the CPU included. Precision is the one departure from the paper's setup."""
    return replace(
        cfg,
        train=replace(
            cfg.train,
            val_every_steps=PAPER_VAL_EVERY_STEPS,
            checkpoint_every_minutes=PAPER_CHECKPOINT_EVERY_MINUTES,
            amp="cuda-bf16",
        ),
        inference=replace(cfg.inference, amp="cuda-bf16"),
    )


# registry.SCALE_NAMES, in the same order
SCALES: dict[str, Any] = {"paper": _paper_scale, "cpu": _cpu_scale, "tiny": _tiny_scale}

__all__ = [
    "CPU_STEPS",
    "PAPER_CHECKPOINT_EVERY_MINUTES",
    "PAPER_VAL_EVERY_STEPS",
    "SCALES",
    "with_update_budget",
]
