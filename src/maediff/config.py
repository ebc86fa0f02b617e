"""Typed configuration: the shared sections, Config, its validation, presets (the
scales they apply are scales.py), YAML load/save.

A Config holds the sections every model shares (geometry, train, data, inference,
augment) and the sections of its model: each model module declares its section types
(`registry.register_section`, beside the code that reads them) and its spec with
`models.register_model(KEY, sections=..., presets=..., check=..., describe=...)`; this
module reads them from the registry (registry.py) and imports no model. The
defaults of the method live in those dataclasses (paper §4.3, docs/method.md,
docs/data.md). Presets are small deltas over a model's default configuration, built
with `dataclasses.replace`, never copies; a scale (paper, cpu, tiny) applies on top.

    cfg = get_preset("cpu")
    cfg = apply_overrides(cfg, ["train.lr=2e-4", "geometry.stride=16"])
    save_config(cfg, "run/config.yaml"); cfg2 = load_config("run/config.yaml")
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints, overload

import yaml

from .registry import (
    ALIASES,
    PRESETS,
    SECTIONS,
    SHARED_SECTIONS,
    SPECS,
    Preset,
    check,
    check_new_preset,
    load_models,
    model_spec,
    models_with,
    plugin_note,
    preset_name,
    section_type,
    split_preset_name,
)
from .scales import SCALES

# --------------------------------------------------------------------------- sections
#
# The shared sections. Each section checks its own values when it is built
# (`__post_init__`); checks that involve two sections (the U-Net against the image
# size, ...) are the model's `check` and `validate`, which Config runs. Every message
# names the offending value.


def _speed_settings(section: str, channels_last: str, compile: str) -> None:
    for name, v in (("channels_last", channels_last), ("compile", compile)):
        check(v in SPEED_MODES, f"{section}.{name}={v!r} must be one of {SPEED_MODES}")


def check_widths(name: str, widths: tuple[int, ...]) -> None:
    """The channel widths of a network section: at least one, each a positive integer."""
    check(
        len(widths) >= 1 and all(isinstance(c, int) and c > 0 for c in widths),
        f"{name}={widths!r} must be positive integer widths",
    )


AMP_MODES = ("none", "bf16", "fp16", "auto", "cuda-bf16")
SPEED_MODES = ("auto", "on", "off")
NYUL_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)


@dataclass(frozen=True)
class GeometryConfig:
    """Hierarchical partition (paper §3.2). Square slices of `image_size` pixels."""

    image_size: int = 96  # H = W
    patch_size: int = 48  # p: upper-level (noised) patch
    stride: int = 16  # s: spacing of patch positions, a multiple of r
    grid_size: int = 16  # r: sub-level grid cell, a multiple of 4

    @property
    def positions_per_axis(self) -> int:
        return (self.image_size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        """K = (H - p + s)(W - p + s) / s^2."""
        return self.positions_per_axis**2

    @property
    def num_cells(self) -> int:
        """N = HW / r^2."""
        return (self.image_size // self.grid_size) ** 2

    def __post_init__(self) -> None:
        validate_geometry(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (paper §4.3, docs/method.md §Training)."""

    optimizer: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int | None = 1600  # None (YAML null): no epoch limit, a step or time budget ends it
    max_steps: int = 0  # 0: no step limit; otherwise stop after this many steps
    max_minutes: float = 0.0  # 0: no time limit
    slices_per_volume: int = 1  # random axial slices per volume per epoch (pDDPM: 1)
    grad_clip: float = 0.0  # 0: no clipping
    # learning-rate schedule over each phase's share of the budget (docs/method.md
    # §Training): linear warm-up over `warmup_steps`, then "constant" (the paper) or
    # "cosine" decay to lr * min_lr_ratio at the end of the step (or time) budget
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # exponential moving average of the weights (0: off). With it, validation and the
    # saved weights (best / last.safetensors) are the averaged ones; the decay ramps up
    # as min(ema_decay, (1 + n) / (10 + n)) over the n steps of the phase
    ema_decay: float = 0.0
    # "none", "bf16", "fp16", "auto" (bf16 where the hardware has it) or "cuda-bf16"
    # (bf16 on a CUDA GPU that has it, fp32 elsewhere: the paper scale's default)
    amp: str = "none"
    seed: int = 0
    val_every: int = 1  # epochs between validation passes
    checkpoint_every: int = 10  # epochs between "last" checkpoints (and resume points)
    # by steps and minutes instead (0: off, the epoch counts above decide): validate at
    # the first epoch end after every `val_every_steps` steps; write the checkpoint at
    # the first epoch end `checkpoint_every_minutes` after the last. The paper scale
    # uses them: its epochs are short (~12 steps) and its files large (docs/method.md
    # §Training)
    val_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    # speed (docs/method.md §Speed): "auto" decides per device, "on" / "off" force it
    channels_last: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        check(
            self.optimizer in ("adam", "adamw"),
            f"train.optimizer={self.optimizer!r} must be 'adam' or 'adamw'",
        )
        check(0 < self.lr < math.inf, f"train.lr={self.lr} must be a number > 0")
        check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        check(
            self.epochs is None or self.epochs >= 1,
            f"train.epochs={self.epochs} must be >= 1, or null for no epoch limit",
        )
        check(
            self.epochs is not None or self.max_steps > 0 or self.max_minutes > 0,
            "train.epochs=null (no epoch limit) needs train.max_steps or train.max_minutes",
        )
        check(self.max_steps >= 0, f"train.max_steps={self.max_steps} must be >= 0 (0: no limit)")
        check(
            0 <= self.max_minutes < math.inf,
            f"train.max_minutes={self.max_minutes} must be a number >= 0 (0: no limit)",
        )
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            check(0 <= v < math.inf, f"train.{name}={v} must be a number >= 0")
        for name in ("val_every", "checkpoint_every"):
            check(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1")
        check(
            self.slices_per_volume >= 1,
            f"train.slices_per_volume={self.slices_per_volume} must be >= 1",
        )
        check(self.amp in AMP_MODES, f"train.amp={self.amp!r} must be one of {AMP_MODES}")
        check(
            self.schedule in ("constant", "cosine"),
            f"train.schedule={self.schedule!r} must be 'constant' or 'cosine'",
        )
        check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        check(
            0.0 <= self.min_lr_ratio <= 1.0,
            f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]",
        )
        check(0.0 <= self.ema_decay < 1.0, f"train.ema_decay={self.ema_decay} must be in [0, 1)")
        check(self.val_every >= 1, f"train.val_every={self.val_every} must be >= 1")
        check(
            self.checkpoint_every >= 1,
            f"train.checkpoint_every={self.checkpoint_every} must be >= 1",
        )
        check(
            self.val_every_steps >= 0, f"train.val_every_steps={self.val_every_steps} must be >= 0"
        )
        check(
            self.checkpoint_every_minutes >= 0,
            f"train.checkpoint_every_minutes={self.checkpoint_every_minutes} must be >= 0",
        )
        _speed_settings("train", self.channels_last, self.compile)

    @property
    def epoch_limit(self) -> float:
        """train.epochs, or infinity where there is no epoch limit (epochs None)."""
        return math.inf if self.epochs is None else self.epochs


@dataclass(frozen=True)
class TrainingRecord:
    """What a model was trained on (docs/labelfree.md §What the model was trained on):
    measured on the training scans when training starts (data/qc.py: training_record),
    saved with the model in `data.trained_on`, and read by the checks that `detect` runs
    on every scan before scoring it. Empty (`scans` 0) in models trained before 0.10.0:
    those checks are then skipped, and detect says so.

    Ranges are (min, max) over the training scans; `landmarks_low` / `landmarks_high`
    bound each intensity landmark (NYUL_PERCENTILES of the brain on the model grid)."""

    scans: int = 0  # training scans measured (0: no record)
    contrast: str = ""  # BIDS suffix of the training scans (T2w, FLAIR, T1w, ...); "" unknown
    # "yes": no training scan has signal outside its brain mask (a scan without a mask,
    # whose brain is image > 0, counts as skull-stripped, as the loader assumes); "no"; ""
    skull_stripped: str = ""
    source: str = ""  # where the scans came from (their description)
    synthetic: bool = False  # the synthetic brains of `maediff synth`, not MRI of people
    voxel_mm: tuple[float, ...] = ()  # (min, max) voxel edge of the input scans, mm
    fov_mm: tuple[float, ...] = ()  # (min, max) field of view (shape x voxel size) per axis, mm
    brain_ml: tuple[float, ...] = ()  # (min, max) brain volume of the input scans, ml
    extent_mm: tuple[float, ...] = ()  # (min, max) bounding-box edge of the brain, mm
    outside_signal: float = 0.0  # max share of the voxels outside the brain with signal
    brain_fraction: tuple[float, ...] = ()  # (min, max) share of the field of view that is brain
    landmarks_low: tuple[float, ...] = ()
    landmarks_high: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check(self.scans >= 0, f"data.trained_on.scans={self.scans} must be >= 0")
        check(
            self.skull_stripped in ("", "yes", "no"),
            f"data.trained_on.skull_stripped={self.skull_stripped!r} must be 'yes', 'no' or ''",
        )
        for name in ("voxel_mm", "fov_mm", "brain_ml", "extent_mm", "brain_fraction"):
            v = getattr(self, name)
            check(
                not v or (len(v) == 2 and v[0] <= v[1]),
                f"data.trained_on.{name}={v} must be empty or (min, max)",
            )
        for name in ("landmarks_low", "landmarks_high"):
            v = getattr(self, name)
            check(
                not v or len(v) == len(NYUL_PERCENTILES),
                f"data.trained_on.{name} must hold {len(NYUL_PERCENTILES)} values, got {len(v)}",
            )


@dataclass(frozen=True)
class DataConfig:
    """Volumes as the model sees them (docs/data.md §3)."""

    volume_shape: tuple[int, int, int] = (96, 96, 50)  # after load-time processing
    spacing: float = 2.0  # mm, after resampling
    center: str = "brain"  # model grid centred on the brain mask's bounding box, or "image"
    curvature_flow: bool = (
        True  # CurvatureFlow(0.125, 3) on images, as the reference (docs/data.md §3)
    )
    percentiles: tuple[float, float] = (1.0, 99.0)  # rescale inside the brain mask
    fold: int = 0
    all_slices: bool = False  # training epoch over every slice instead of one random one
    min_brain_fraction: float = 0.0  # skip training slices with less brain than this
    # histogram standardisation at load time (Nyul & Udupa 2000; docs/data.md §3):
    # "nyul" maps each volume's brain percentiles (NYUL_PERCENTILES) piecewise-linearly
    # onto `landmarks`, the mean of the training volumes' percentiles. The trainer
    # always learns the landmarks, so a model trained without it can use it at test time.
    standardise: str = "none"
    landmarks: tuple[float, ...] = ()
    # what the model was trained on, measured on the training scans (TrainingRecord)
    trained_on: TrainingRecord = TrainingRecord()

    def __post_init__(self) -> None:
        check(0 <= self.fold <= 4, f"data.fold={self.fold} must be in 0..4")
        lo, hi = self.percentiles
        check(
            0 <= lo < hi <= 100,
            f"data.percentiles={self.percentiles} must satisfy 0 <= low < high <= 100",
        )
        check(
            len(self.volume_shape) == 3 and self.volume_shape[0] == self.volume_shape[1],
            f"data.volume_shape={self.volume_shape} must have 3 entries with square axial slices",
        )
        check(
            all(isinstance(n, int) and n >= 1 for n in self.volume_shape),
            f"data.volume_shape={self.volume_shape} must hold voxel counts >= 1",
        )
        check(
            self.center in ("brain", "image"),
            f"data.center={self.center!r} must be 'brain' or 'image'",
        )
        check(self.spacing > 0, f"data.spacing={self.spacing} must be > 0")
        check(
            self.standardise in ("none", "nyul"),
            f"data.standardise={self.standardise!r} must be 'none' or 'nyul'",
        )
        check(
            not self.landmarks or len(self.landmarks) == len(NYUL_PERCENTILES),
            f"data.landmarks must hold {len(NYUL_PERCENTILES)} values, got {len(self.landmarks)}",
        )
        check(
            all(a <= b for a, b in zip(self.landmarks, self.landmarks[1:])),
            f"data.landmarks={self.landmarks} must be non-decreasing",
        )


@dataclass(frozen=True)
class InferenceConfig:
    batch_size: int = 64  # (slice, patch) inputs per forward pass in reconstruct()
    amp: str = "none"  # as train.amp: "none", "bf16", "fp16", "auto" or "cuda-bf16"
    seed: int = 0  # noise seed of detect / evaluate when --seed is not given
    # Skip (slice, patch) pairs whose patch holds no brain voxel: brain voxels get exactly
    # the full Alg. 2 result; voxels outside the brain keep the input (0 after skull stripping).
    skip_empty_patches: bool = True
    # noise-ensembled scoring (beyond the paper, docs/method.md §Ensembles): the anomaly
    # map is the mean of |x - rec| over `ensemble_draws` noise fields at each t in
    # `ensemble_t` (empty: diffusion.t_test alone); one batched pass over all members
    ensemble_t: tuple[int, ...] = ()
    ensemble_draws: int = 1
    # lesion-guided patch selection (beyond the paper, its future work; docs/method.md
    # §Guided patches): "all" denoises every patch position (Alg. 2); "guided" first
    # reconstructs at stride s = p (non-overlapping patches), flags the grid cells whose
    # mean coarse anomaly lies above the `guided_quantile` of the brain cells, and
    # denoises at the full stride only the patches that cover a flagged cell
    patch_selection: str = "all"
    guided_quantile: float = 0.9
    # the reconstruction's range, the same for every model (models/base.py, the one
    # driver): false (default) keeps the model's output as it is, as pDDPM's evaluation
    # does for its diffusion models; true clamps it to the image range [0, 1]
    clamp: bool = False
    channels_last: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        check(self.amp in AMP_MODES, f"inference.amp={self.amp!r} must be one of {AMP_MODES}")
        check(self.batch_size >= 1, f"inference.batch_size={self.batch_size} must be >= 1")
        check(
            self.ensemble_draws >= 1,
            f"inference.ensemble_draws={self.ensemble_draws} must be >= 1",
        )
        check(
            all(isinstance(t, int) and t >= 1 for t in self.ensemble_t),
            f"inference.ensemble_t={self.ensemble_t} must hold timesteps >= 1",
        )
        check(
            self.patch_selection in ("all", "guided"),
            f"inference.patch_selection={self.patch_selection!r} must be 'all' or 'guided'",
        )
        check(
            0.0 <= self.guided_quantile < 1.0,
            f"inference.guided_quantile={self.guided_quantile} must be in [0, 1)",
        )
        _speed_settings("inference", self.channels_last, self.compile)


@dataclass(frozen=True)
class AugmentConfig:
    """Intensity augmentation of the training slices (beyond the paper, docs/method.md
    §Site robustness): each transform is applied to a sample with `probability`,
    inside the brain (pixels > 0); the model then inpaints in whatever contrast the
    visible context shows."""

    enabled: bool = False
    probability: float = 0.5  # per transform and sample
    contrast: float = 0.3  # std of the log-slopes of a random monotone intensity curve
    gamma: tuple[float, float] = (0.7, 1.5)  # exponent range (log-uniform)
    bias_field: float = 0.3  # std of a smooth log-multiplicative field (3x3 control points)
    noise_std: tuple[float, float] = (0.0, 0.04)  # Gaussian noise std range
    blur_sigma: tuple[float, float] = (0.0, 1.0)  # Gaussian blur sigma range (pixels)

    def __post_init__(self) -> None:
        check(
            0 <= self.probability <= 1, f"augment.probability={self.probability} must be in [0, 1]"
        )
        for name in ("gamma", "noise_std", "blur_sigma"):
            lo, hi = getattr(self, name)
            check(0 <= lo <= hi, f"augment.{name}={(lo, hi)} must satisfy 0 <= low <= high")
        check(self.gamma[0] > 0, f"augment.gamma={self.gamma} must be > 0")
        check(
            self.contrast >= 0 and self.bias_field >= 0,
            "augment.contrast and augment.bias_field must be >= 0",
        )


# --------------------------------------------------------------------------- Config

S = TypeVar("S")


@dataclass(frozen=True, init=False)
class Config:
    """A whole configuration: the shared sections plus the sections of model `model`.

    The model's own sections (`cfg.unet`, `cfg.dae`, ...) read as attributes, and
    `dataclasses.replace(cfg, unet=...)` replaces one. Changing `model` keeps the carried
    sections the new model also has and gives the others their defaults."""

    name: str
    model: str
    geometry: GeometryConfig
    train: TrainConfig
    data: DataConfig
    inference: InferenceConfig
    augment: AugmentConfig
    sections: tuple[tuple[str, Any], ...]  # (name, section) of the model's own sections

    def __init__(
        self,
        name: str = "paper",
        model: str = "maediff",
        geometry: GeometryConfig | None = None,
        train: TrainConfig | None = None,
        data: DataConfig | None = None,
        inference: InferenceConfig | None = None,
        augment: AugmentConfig | None = None,
        sections: Any = (),
        **own: Any,
    ) -> None:
        spec = model_spec(model)
        wrong = [k for k in own if k not in spec.sections]
        if wrong:
            raise ValueError(
                f"config section(s) {wrong} do not belong to model {model!r}, whose sections "
                f"are {list(spec.sections) or 'none'}"
            )
        carried = dict(sections)
        held = []
        for k in spec.sections:
            cls = section_type(k)
            v = own.get(k, carried.get(k))
            if v is None:
                v = cls()
            elif not isinstance(v, cls):
                raise TypeError(f"config section {k!r} must be a {cls.__name__}, got {v!r}")
            held.append((k, v))
        values = {
            "name": name,
            "model": model,
            "geometry": geometry if geometry is not None else GeometryConfig(),
            "train": train if train is not None else TrainConfig(),
            "data": data if data is not None else DataConfig(),
            "inference": inference if inference is not None else InferenceConfig(),
            "augment": augment if augment is not None else AugmentConfig(),
            "sections": tuple(held),
        }
        for k, v in values.items():
            object.__setattr__(self, k, v)
        validate(self)

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields
        if name.startswith("__"):
            raise AttributeError(name)
        for k, v in self.__dict__.get("sections", ()):
            if k == name:
                return v
        model = self.__dict__.get("model")
        held = [k for k, _ in self.__dict__.get("sections", ())]
        raise AttributeError(
            f"a {model!r} configuration has no section {name!r} (its own sections: {held or 'none'})"
        )

    @property
    def section_names(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.sections)

    @overload
    def section(self, kind: type[S]) -> S: ...

    @overload
    def section(self, kind: str) -> Any: ...

    def section(self, kind: type[S] | str) -> S | Any:
        """The model's section of type `kind`, typed for type checkers and editors:
        `cfg.section(DAEConfig).noise_res` (`cfg.dae` reads the same section, untyped);
        AttributeError naming the model's sections when it holds none of that type
        (`holds` asks first). By name (`cfg.section("diffusion")`, for code that knows
        only the name): the section, or None when the model has none."""
        if isinstance(kind, str):
            return dict(self.sections).get(kind)
        for _, v in self.sections:
            if type(v) is kind:
                return v
        raise AttributeError(
            f"a {self.model!r} configuration has no {kind.__name__} section "
            f"(its own sections: {list(self.section_names) or 'none'})"
        )

    def holds(self, kind: type) -> bool:
        """Whether the model has a section of type `kind`."""
        return any(type(v) is kind for _, v in self.sections)


# --------------------------------------------------------------------------- validation


def validate_geometry(g: GeometryConfig) -> None:
    """Raise ValueError for a partition that does not fit paper §3.2."""
    H, p, s, r = g.image_size, g.patch_size, g.stride, g.grid_size
    for name, v in (("image_size", H), ("patch_size", p), ("stride", s), ("grid_size", r)):
        check(isinstance(v, int) and v > 0, f"geometry.{name}={v!r} must be a positive integer")
    check(
        r % 4 == 0,
        f"geometry.grid_size r={r} must be a multiple of 4 (cells are r/4 on the H/4 feature map)",
    )
    check(s % r == 0, f"geometry.stride s={s} must be a multiple of grid_size r={r}")
    check(p <= H, f"geometry.patch_size p={p} is larger than image_size {H}")
    check(p % r == 0, f"geometry.patch_size p={p} must be a multiple of grid_size r={r}")
    check(H % r == 0, f"geometry.image_size {H} must be a multiple of grid_size r={r}")
    check(
        (H - p) % s == 0,
        f"patch positions do not tile the image: (image_size {H} - patch_size {p}) is not a multiple of stride {s}",
    )


def check_downsampling(cfg: Config, name: str, n: int) -> None:
    """image_size must be divisible by 2^n, the downsampling of section field `name`."""
    H = cfg.geometry.image_size
    check(
        H % 2**n == 0,
        f"image_size {H} must be divisible by 2^{n} = {2**n}, the downsampling of {name}",
    )


def validate(cfg: Config) -> None:
    """Checks across sections: the inference options the model implements (its spec's
    `options`), then the model's own checks, its spec's `check` (each section checks its
    own values when built)."""
    spec = model_spec(cfg.model)
    inf, g = cfg.inference, cfg.geometry
    H, p = g.image_size, g.patch_size
    check(
        inf.patch_selection == "all" or "guided_patches" in spec.options,
        f"inference.patch_selection='guided' {option_of('guided_patches', cfg.model)}",
    )
    if inf.patch_selection == "guided":
        check(
            (H - p) % p == 0 and p % g.stride == 0,
            f"guided patch selection tiles the slice with the patches at stride p: needs "
            f"(image_size - patch_size) % patch_size == 0 and patch_size % stride == 0 ({g})",
        )
    check(
        (not inf.ensemble_t and inf.ensemble_draws == 1) or "noise_ensembles" in spec.options,
        f"noise ensembles (inference.ensemble_t / ensemble_draws) {option_of('noise_ensembles', cfg.model)}",
    )
    diffusion = cfg.section("diffusion")  # the schedule the ensemble's timesteps lie on
    if inf.ensemble_t and diffusion is not None:
        T = diffusion.timesteps
        check(
            all(1 <= t <= T for t in inf.ensemble_t),
            f"inference.ensemble_t={list(inf.ensemble_t)} must hold timesteps in 1..{T} "
            "(diffusion.timesteps)",
        )
    if spec.check is not None:
        spec.check(cfg)


def option_of(option: str, model: str) -> str:
    """The end of the message refusing inference option `option` (a ModelSpec option)
    to `model`: which registered models have it."""
    have = models_with(option)
    return f"is an option of model {' / '.join(have) or '(none registered)'} (model={model!r})"


# --------------------------------------------------------------------------- presets
#
# A preset is a model (a row of the paper's Table 1 or 2) at a scale. Its model module
# declares it (`Preset`: a small delta over the model's default configuration); the
# scale (scales.py) is one function applied to any model. Preset names: MODEL (paper
# scale), MODEL-cpu, MODEL-tiny.


def display_name(cfg: Config) -> str:
    """The table row of a configuration: its preset's row name, else its model's."""
    base, _ = split_preset_name(cfg.name)
    if base not in PRESETS or cfg.model not in SPECS:
        load_models()
    if base in PRESETS:
        return PRESETS[base][1].row
    if cfg.model in PRESETS:
        return PRESETS[cfg.model][1].row
    return cfg.name


def _build(name: str) -> Config:
    base, scale = split_preset_name(name)
    key, p = PRESETS[base]
    cfg = Config(model=key)
    if p.delta is not None:
        cfg = p.delta(cfg)
    return replace(SCALES[scale](cfg), name=name)


def preset_names() -> list[str]:
    """Every preset name: each model at each scale, and the aliases."""
    load_models()
    return [preset_name(m, s) for m in PRESETS for s in SCALES] + list(ALIASES)


def register_preset(model: str, delta: Any, row: str) -> None:
    """Presets MODEL, MODEL-cpu and MODEL-tiny for a model of another package declared
    without `presets=` in its register_model: `delta` maps the default configuration
    Config() to this model's (at least `model=`), `row` is its name in tables. The
    scales apply on top, as for the built-in models."""
    check_new_preset(model, row)
    probe = delta(Config())
    if probe.model != model and probe.model not in PRESETS:
        raise ValueError(
            f"preset {model!r} is the first of model {probe.model!r}: it must be named "
            f"{probe.model!r} (a model's key is also the name of its own row)"
        )
    PRESETS[model] = (probe.model, Preset(model, row, lambda c: delta(Config())))


def get_preset(name: str) -> Config:
    base, scale = split_preset_name(name)
    if base not in PRESETS:  # the registry's loader imports the models and plug-ins
        load_models()
    if (
        base not in PRESETS
        or scale not in SCALES
        or preset_name(base, scale) != ALIASES.get(name, name)
    ):
        raise ValueError(
            f"unknown preset {name!r}; choose one of {sorted(preset_names())}{plugin_note(name)}"
        )
    cfg = _build(ALIASES.get(name, name))
    return replace(cfg, name=name)


# --------------------------------------------------------------------------- (de)serialisation


class _PlainLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a configuration never needs them, and nested
    aliases expand to gigabytes from a few lines (an "alias bomb")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """Plain data from YAML text: safe tags only and no aliases. Raises ValueError with
    a one-line reason (the problem and where it is)."""
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{problem}{where}") from e


def _show(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: error messages stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as plain data: name, model, geometry, the model's own sections,
    then train, data, inference, augment (what config.yaml holds)."""

    def conv(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    out: dict[str, Any] = {"name": cfg.name, "model": cfg.model, "geometry": conv(cfg.geometry)}
    for k, v in cfg.sections:
        out[k] = conv(v)
    for k in SHARED_SECTIONS[1:]:
        out[k] = conv(getattr(cfg, k))
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if is_dataclass(hint):  # a record inside a section (data.trained_on)
        return value if isinstance(value, hint) else _section_from_dict(hint, value, where)
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}={_show(value)} must be a list")
        args = hint.__args__
        item = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}={_show(value)} must have {len(args)} entries")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        return tuple(_coerce(v, item, where) for v in value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}={_show(value)} must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ValueError(f"{where}={_show(value)} must be an integer")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}={_show(value)} must be true or false")
        return value
    if hint is str:
        if isinstance(value, bool):
            # YAML 1.1 reads on/off/yes/no as booleans; the text options that take such
            # words (compile, channels_last: auto/on/off) mean on and off by them
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ValueError(f"{where}={_show(value)} must be a string")
        return value
    return value


def _section_from_dict(cls: Any, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {name!r} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}")
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in data.items()})


_SHARED_TYPES = {
    "geometry": GeometryConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "inference": InferenceConfig,
    "augment": AugmentConfig,
}


def _from_full_dict(data: dict[str, Any]) -> Config:
    """A Config from a complete dict (every section of the model present). Sections of
    other models are ignored: configurations written before 0.5.0 hold every model's."""
    if not isinstance(data, dict):
        raise ValueError(f"a configuration must be a mapping, got {type(data).__name__}")
    model = data.get("model", "maediff")
    name = data.get("name", "paper")
    for k, v in (("model", model), ("name", name)):
        if not isinstance(v, str):
            raise ValueError(f"{k}={_show(v)} must be a string")
    spec = model_spec(model)
    kwargs: dict[str, Any] = {"name": name, "model": model}
    unknown = []
    for k, v in data.items():
        if k in ("name", "model"):
            continue
        if k in _SHARED_TYPES:
            kwargs[k] = _section_from_dict(_SHARED_TYPES[k], v, k)
        elif k in spec.sections:
            kwargs[k] = _section_from_dict(section_type(k), v, k)
        elif k not in SECTIONS:
            unknown.append(k)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(sorted(unknown))}")
    return Config(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) nested dict; missing keys keep the
    defaults of its model (`model`, default maediff).

    A top-level `preset: NAME` key starts from that preset instead. Sections that belong
    to other models are ignored (files written before 0.5.0 carry every model's)."""
    if not isinstance(data, dict):
        raise ValueError(f"a configuration must be a mapping, got {type(data).__name__}")
    data = dict(data)
    if "preset" in data:
        base = get_preset(data.pop("preset"))
        if "model" in data and data["model"] != base.model:
            base = replace(base, model=data["model"])
    else:
        model = data.get("model", "maediff")
        if not isinstance(model, str):
            raise ValueError(f"model={_show(model)} must be a string")
        base = Config(model=model)
    return _from_full_dict(_no_epoch_limit(_deep_merge(to_dict(base), data)))


# `train.epochs: null` is "no epoch limit" (a step or time budget ends the run); up to
# 0.9.0 a large count said it (100000 or 1000000), which reads as null beside a step or
# time budget, so that an old run is the same configuration as today's plan of it
OLD_NO_EPOCH_LIMIT = 100000


def _no_epoch_limit(data: Any) -> Any:
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict) or not isinstance(train.get("epochs"), int):
        return data
    budget = train.get("max_steps") or train.get("max_minutes")
    if train["epochs"] >= OLD_NO_EPOCH_LIMIT and budget:
        return {**data, "train": {**train, "epochs": None}}
    return data


def _deep_merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path) -> Config:
    path = Path(path)
    data = read_config_file(path)
    try:
        return from_dict(data or {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def read_config_file(path: str | Path) -> Any:
    """The plain data of a YAML (no aliases, safe tags) or JSON configuration file;
    ValueError naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(
            f"config file {path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: {e}"
        ) from e
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    data = to_dict(cfg)
    text = (
        json.dumps(data, indent=2)
        if path.suffix == ".json"
        else yaml.safe_dump(data, sort_keys=False)
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _near_key(key: str, data: dict) -> str:
    """The "; did you mean train.max_steps?" of a mistyped key of a configuration dict."""
    keys = [f"{s}.{k}" for s, v in data.items() if isinstance(v, dict) for k in v]
    keys += [k for k, v in data.items() if not isinstance(v, dict)]
    near = difflib.get_close_matches(key.strip(), keys, n=1)
    return f"; did you mean {near[0]}?" if near else ""


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` overrides; values are parsed as YAML scalars/lists.
    `model=KEY` changes the model (its sections start from their defaults)."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                held = ", ".join(k for k, v in data.items() if isinstance(v, dict))
                raise ValueError(
                    f"unknown config section {key!r} in override {item!r}{_near_key(key, data)} "
                    f"(a {data['model']!r} configuration has {held})"
                )
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(
                f"unknown config key {key!r} in override {item!r}{_near_key(key, data)}"
            )
        try:
            value = load_yaml(raw)
        except ValueError as e:
            raise ValueError(f"override {_show(item)}: the value is not plain YAML: {e}") from e
        if isinstance(value, bool) and isinstance(node[parts[-1]], str):
            value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans: keep the text
        node[parts[-1]] = value
        if parts == ["model"]:  # the new model's sections: carried where shared, else defaults
            new = replace(cfg, model=node["model"])
            data = {**to_dict(new), **{k: v for k, v in data.items() if k in _SHARED_TYPES}}
            data["model"], data["name"] = new.model, cfg.name
    return _from_full_dict(data)


def describe_size(cfg: Config) -> str:
    """The start of every model's description: "NAME (MODEL): HxW"."""
    g = cfg.geometry
    return f"{cfg.name} ({cfg.model}): {g.image_size}x{g.image_size}"


def describe(cfg: Config) -> str:
    """One-line summary used in logs and model cards (the model's spec writes it)."""
    spec = model_spec(cfg.model)
    return spec.describe(cfg) if spec.describe is not None else describe_size(cfg)


__all__ = [
    "AMP_MODES",
    "NYUL_PERCENTILES",
    "SPEED_MODES",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "GeometryConfig",
    "InferenceConfig",
    "TrainConfig",
    "TrainingRecord",
    "apply_overrides",
    "check_downsampling",
    "check_widths",
    "describe",
    "describe_size",
    "display_name",
    "from_dict",
    "get_preset",
    "load_config",
    "load_yaml",
    "option_of",
    "preset_names",
    "read_config_file",
    "register_preset",
    "save_config",
    "to_dict",
    "validate",
    "validate_geometry",
]
