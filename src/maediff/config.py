"""Typed configuration with the paper's defaults, presets, YAML load/save.

Every default of the method lives here (paper §4.3, PROTOCOL.md §1-6). Variants are
presets built from the paper configuration with `dataclasses.replace`, never copies.

    cfg = get_preset("cpu")
    cfg = apply_overrides(cfg, ["train.lr=2e-4", "geometry.stride=16"])
    save_config(cfg, "run/config.yaml"); cfg2 = load_config("run/config.yaml")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints

import yaml

# --------------------------------------------------------------------------- sections


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


@dataclass(frozen=True)
class UNetConfig:
    """pDDPM / ADM diffusion U-Net (PROTOCOL.md §4)."""

    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 3
    # Global self-attention in encoder and decoder at these downsampling factors
    # (1 = full resolution, 2 = H/2, 4 = H/4). The middle block always has one.
    attention_levels: tuple[int, ...] = ()
    num_head_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    # Feed the visible region x^_0 and the patch mask as two extra input channels
    # (paper Eq. 8-9 leave this open; off = the noised image alone, PROTOCOL.md §2).
    condition_channels: bool = False


@dataclass(frozen=True)
class MAEConfig:
    """MAE module on the U-Net encoder feature map (paper §3.3, §4.3)."""

    enabled: bool = True
    enc_dim: int = 384  # d1
    enc_depth: int = 12
    enc_heads: int = 6
    dec_dim: int = 512  # d2
    dec_depth: int = 8
    dec_heads: int = 16
    mlp_ratio: float = 4.0
    timestep: bool = False  # add the timestep embedding to the decoder tokens


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward process (paper Eq. 1-3, §4.3)."""

    schedule: str = "linear"  # "linear" (paper) or "cosine" (pDDPM code)
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    cosine_s: float = 0.008
    timesteps: int = 1000  # T
    t_test: int = 500  # 1-based: alpha_bar(t) = alphas_cumprod[t - 1]
    t_train_min: int = 1  # training t ~ U{t_train_min .. t_train_max}
    t_train_max: int = 1000


@dataclass(frozen=True)
class NoiseConfig:
    """Noise of the forward process (paper Alg. 1, PROTOCOL.md §3)."""

    kind: str = "simplex"  # "simplex" or "gaussian"
    octaves: int = 6
    persistence: float = 0.8
    frequency: float = 2.0**-6  # base frequency; doubled each octave
    # Scale each field to zero mean and unit std. The reference sums the octaves
    # without normalising (std about 0.5-0.6); False keeps that noise level.
    normalise: bool = False
    # Reference parity: one field drawn per call and repeated over the batch.
    shared: bool = False
    # 0: draw fresh fields every call. >0: a seeded bank of that many fields, each
    # use taking a random one with a random flip, 90-degree rotation and roll.
    bank_size: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (paper §4.3, PROTOCOL.md §5)."""

    optimizer: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 1600
    max_steps: int = 0  # 0: no step limit; otherwise stop after this many steps
    max_minutes: float = 0.0  # 0: no time limit
    slices_per_volume: int = 1  # pDDPM: one random axial slice per volume per epoch
    grad_clip: float = 0.0  # 0: no clipping
    amp: str = "none"  # "none", "bf16", "fp16" or "auto" (bf16 where the hardware has it)
    seed: int = 0
    val_every: int = 1  # epochs between validation passes
    checkpoint_every: int = 10  # epochs between "last" checkpoints (and resume points)
    num_workers: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Volumes as the model sees them (PROTOCOL.md §6)."""

    volume_shape: tuple[int, int, int] = (96, 96, 50)  # after load-time processing
    spacing: float = 2.0  # mm, after resampling
    center: str = "brain"  # model grid centred on the brain mask's bounding box, or "image"
    curvature_flow: bool = False  # pDDPM parity: CurvatureFlow(0.125, 3) on images
    percentiles: tuple[float, float] = (1.0, 99.0)  # rescale inside the brain mask
    fold: int = 0
    all_slices: bool = False  # training epoch over every slice instead of one random one
    min_brain_fraction: float = 0.0  # skip training slices with less brain than this


@dataclass(frozen=True)
class InferenceConfig:
    batch_size: int = 64  # (slice, patch) inputs per forward pass in reconstruct()
    amp: str = "none"  # "none", "bf16", "fp16" or "auto" (bf16 where the hardware has it)
    seed: int = 0
    # Skip (slice, patch) pairs whose patch holds no brain voxel: brain voxels get exactly
    # the full Alg. 2 result; voxels outside the brain keep the input (0 after skull stripping).
    skip_empty_patches: bool = True


@dataclass(frozen=True)
class Config:
    name: str = "paper"
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def validate_geometry(g: GeometryConfig) -> None:
    """Raise ValueError for a partition that does not fit paper §3.2."""
    H, p, s, r = g.image_size, g.patch_size, g.stride, g.grid_size
    for name, v in (("image_size", H), ("patch_size", p), ("stride", s), ("grid_size", r)):
        _check(isinstance(v, int) and v > 0, f"geometry.{name}={v!r} must be a positive integer")
    _check(
        r % 4 == 0,
        f"geometry.grid_size r={r} must be a multiple of 4 (cells are r/4 on the H/4 feature map)",
    )
    _check(s % r == 0, f"geometry.stride s={s} must be a multiple of grid_size r={r}")
    _check(p <= H, f"geometry.patch_size p={p} is larger than image_size {H}")
    _check(p % r == 0, f"geometry.patch_size p={p} must be a multiple of grid_size r={r}")
    _check(H % r == 0, f"geometry.image_size {H} must be a multiple of grid_size r={r}")
    _check(
        (H - p) % s == 0,
        f"patch positions do not tile the image: (image_size {H} - patch_size {p}) is not a multiple of stride {s}",
    )


def validate(cfg: Config) -> None:
    """Raise ValueError naming the offending value for any invalid combination."""
    g, u, m, d, n = cfg.geometry, cfg.unet, cfg.mae, cfg.diffusion, cfg.noise
    validate_geometry(g)
    H, p = g.image_size, g.patch_size
    _check(
        u.model_channels > 0 and len(u.channel_mult) > 0,
        f"unet.channel_mult={u.channel_mult!r} must be non-empty",
    )
    widths = [u.model_channels * k for k in u.channel_mult]
    for w in widths:
        _check(
            w % u.norm_groups == 0,
            f"unet.norm_groups={u.norm_groups} does not divide channel width {w}",
        )
        _check(
            w % u.num_head_channels == 0,
            f"unet.num_head_channels={u.num_head_channels} does not divide channel width {w}",
        )
    downs = 2 ** (len(u.channel_mult) - 1)
    _check(
        H % downs == 0, f"image_size {H} must be divisible by the U-Net downsampling factor {downs}"
    )
    valid_levels = {2**i for i in range(len(u.channel_mult))}
    for a in u.attention_levels:
        _check(
            a in valid_levels,
            f"unet.attention_levels entry {a} is not one of the U-Net's downsampling factors {sorted(valid_levels)}",
        )
    _check(u.num_res_blocks >= 1, f"unet.num_res_blocks={u.num_res_blocks} must be >= 1")
    _check(0.0 <= u.dropout < 1.0, f"unet.dropout={u.dropout} must be in [0, 1)")

    if m.enabled:
        _check(
            downs == 4,
            f"the MAE needs the U-Net encoder output at H/4, but channel_mult={u.channel_mult} gives H/{downs}",
        )
        _check(
            m.enc_dim % m.enc_heads == 0,
            f"mae.enc_heads={m.enc_heads} does not divide mae.enc_dim={m.enc_dim}",
        )
        _check(
            m.dec_dim % m.dec_heads == 0,
            f"mae.dec_heads={m.dec_heads} does not divide mae.dec_dim={m.dec_dim}",
        )
        _check(
            m.enc_depth >= 1 and m.dec_depth >= 1,
            f"mae depths must be >= 1 (enc_depth={m.enc_depth}, dec_depth={m.dec_depth})",
        )
        _check(
            p < H,
            f"with the MAE enabled the patch (p={p}) must leave visible cells in the image ({H})",
        )

    _check(
        d.schedule in ("linear", "cosine"),
        f"diffusion.schedule={d.schedule!r} must be 'linear' or 'cosine'",
    )
    _check(d.timesteps >= 2, f"diffusion.timesteps={d.timesteps} must be >= 2")
    _check(
        0 < d.beta_start < d.beta_end < 1,
        f"diffusion betas must satisfy 0 < beta_start ({d.beta_start}) < beta_end ({d.beta_end}) < 1",
    )
    _check(1 <= d.t_test <= d.timesteps, f"diffusion.t_test={d.t_test} must be in 1..{d.timesteps}")
    _check(
        1 <= d.t_train_min <= d.t_train_max <= d.timesteps,
        f"diffusion training range t_train_min={d.t_train_min}..t_train_max={d.t_train_max} must lie in 1..{d.timesteps}",
    )

    _check(
        n.kind in ("simplex", "gaussian"), f"noise.kind={n.kind!r} must be 'simplex' or 'gaussian'"
    )
    _check(n.octaves >= 1, f"noise.octaves={n.octaves} must be >= 1")
    _check(n.frequency > 0, f"noise.frequency={n.frequency} must be > 0")
    _check(n.bank_size >= 0, f"noise.bank_size={n.bank_size} must be >= 0")

    t = cfg.train
    _check(
        t.optimizer in ("adam", "adamw"),
        f"train.optimizer={t.optimizer!r} must be 'adam' or 'adamw'",
    )
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    for name, amp in (("train.amp", t.amp), ("inference.amp", cfg.inference.amp)):
        _check(
            amp in ("none", "bf16", "fp16", "auto"),
            f"{name}={amp!r} must be 'none', 'bf16', 'fp16' or 'auto'",
        )
    _check(
        cfg.inference.batch_size >= 1,
        f"inference.batch_size={cfg.inference.batch_size} must be >= 1",
    )
    _check(0 <= cfg.data.fold <= 4, f"data.fold={cfg.data.fold} must be in 0..4")
    lo, hi = cfg.data.percentiles
    _check(
        0 <= lo < hi <= 100,
        f"data.percentiles={cfg.data.percentiles} must satisfy 0 <= low < high <= 100",
    )
    _check(
        len(cfg.data.volume_shape) == 3,
        f"data.volume_shape={cfg.data.volume_shape} must have 3 entries",
    )
    _check(
        cfg.data.center in ("brain", "image"),
        f"data.center={cfg.data.center!r} must be 'brain' or 'image'",
    )
    _check(cfg.data.spacing > 0, f"data.spacing={cfg.data.spacing} must be > 0")
    _check(
        cfg.data.volume_shape[0] == cfg.data.volume_shape[1],
        f"data.volume_shape={cfg.data.volume_shape}: axial slices must be square",
    )


# --------------------------------------------------------------------------- presets


def _paper() -> Config:
    return Config(name="paper")


def _no_mae(cfg: Config, name: str, **geometry: int) -> Config:
    return replace(
        cfg,
        name=name,
        mae=replace(cfg.mae, enabled=False),
        geometry=replace(cfg.geometry, **geometry),
    )


def _with_attention(cfg: Config, name: str) -> Config:
    # Table 2 "Att.": global attention at 48x48 and 24x24 (H/2, H/4) in encoder and decoder.
    return replace(cfg, name=name, unet=replace(cfg.unet, attention_levels=(2, 4)))


def _cpu() -> Config:
    """The paper's structure (K=16, N=36) scaled to train usefully on 2 CPU cores."""
    return Config(
        name="cpu",
        geometry=GeometryConfig(image_size=48, patch_size=24, stride=8, grid_size=8),
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            num_head_channels=32,
            norm_groups=16,
        ),
        mae=MAEConfig(enc_dim=128, enc_depth=4, enc_heads=4, dec_dim=128, dec_depth=2, dec_heads=4),
        diffusion=DiffusionConfig(),
        # 48x48 slices of the protocol's 96x96: double the per-pixel frequency so the
        # noise keeps the physical scale of the paper's 2^-6 at 96x96
        noise=NoiseConfig(frequency=2.0**-5),
        train=TrainConfig(
            lr=3e-4, batch_size=32, epochs=100000, max_minutes=6.0, amp="auto", val_every=10
        ),
        data=DataConfig(),
        inference=InferenceConfig(batch_size=32, amp="auto"),
    )


def _tiny() -> Config:
    """Smallest useful configuration: unit tests and the end-to-end CLI test."""
    return Config(
        name="tiny",
        geometry=GeometryConfig(image_size=32, patch_size=16, stride=8, grid_size=8),
        unet=UNetConfig(
            model_channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            num_head_channels=16,
            norm_groups=8,
        ),
        mae=MAEConfig(enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=2, dec_heads=2),
        diffusion=DiffusionConfig(timesteps=20, t_test=10, t_train_max=20),
        train=TrainConfig(lr=1e-3, batch_size=8, epochs=2),
        data=DataConfig(volume_shape=(32, 32, 8), spacing=6.0),
        inference=InferenceConfig(batch_size=64),
    )


def _build_presets() -> dict[str, Any]:
    paper = _paper
    return {
        "paper": paper,
        "pddpm-s48": lambda: _no_mae(paper(), "pddpm-s48", stride=48),
        "pddpm-s16": lambda: _no_mae(paper(), "pddpm-s16", stride=16),
        "ablation-unet": lambda: _no_mae(paper(), "ablation-unet"),
        "ablation-unet-att": lambda: _with_attention(
            _no_mae(paper(), "ablation-unet-att"), "ablation-unet-att"
        ),
        "ablation-unet-mae": lambda: replace(paper(), name="ablation-unet-mae"),
        "ablation-unet-att-mae": lambda: _with_attention(paper(), "ablation-unet-att-mae"),
        "cpu": _cpu,
        "tiny": _tiny,
    }


PRESETS = _build_presets()


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Config) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}={value!r} must be a list")
        args = hint.__args__
        item = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}={value!r} must have {len(args)} entries")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        return tuple(_coerce(v, item, where) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}={value!r} must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ValueError(f"{where}={value!r} must be an integer")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r} must be true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r} must be a string")
        return value
    return value


def _from_dict(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(
            f"config section {prefix or 'root'!r} must be a mapping, got {type(data).__name__}"
        )
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for k, v in data.items():
        hint = hints[k]
        if is_dataclass(hint):
            kwargs[k] = _from_dict(hint, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, hint, prefix + k)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) nested dict; missing keys keep defaults.

    A top-level `preset: NAME` key starts from that preset instead of the paper defaults.
    """
    data = dict(data)
    base = to_dict(get_preset(data.pop("preset"))) if "preset" in data else to_dict(Config())
    merged = _deep_merge(base, data)
    return _from_dict(Config, merged, "")


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
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(
            f"config file {path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: {e}"
        ) from e
    try:
        return from_dict(data or {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


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


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` overrides; values are parsed as YAML scalars/lists."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown config section {key!r} in override {item!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"unknown config key {key!r} in override {item!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return _from_dict(Config, data, "")


def describe(cfg: Config) -> str:
    """One-line summary used in logs and model cards."""
    g = cfg.geometry
    return (
        f"{cfg.name}: {g.image_size}x{g.image_size}, p={g.patch_size} s={g.stride} r={g.grid_size} "
        f"(K={g.num_patches}, N={g.num_cells}), U-Net {cfg.unet.model_channels}x{list(cfg.unet.channel_mult)}"
        f" x{cfg.unet.num_res_blocks}, att={list(cfg.unet.attention_levels)}, MAE={'on' if cfg.mae.enabled else 'off'}, "
        f"{cfg.diffusion.schedule} T={cfg.diffusion.timesteps} t_test={cfg.diffusion.t_test}, noise={cfg.noise.kind}"
    )


__all__ = [
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "GeometryConfig",
    "InferenceConfig",
    "MAEConfig",
    "NoiseConfig",
    "PRESETS",
    "TrainConfig",
    "UNetConfig",
    "apply_overrides",
    "describe",
    "from_dict",
    "get_preset",
    "load_config",
    "save_config",
    "to_dict",
    "validate",
    "validate_geometry",
]
