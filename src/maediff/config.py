"""Typed configuration with the paper's defaults, presets, YAML load/save.

Every default of the method lives here (paper §4.3, docs/method.md, docs/data.md). Variants are
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
#
# Each section checks its own values when it is built (`__post_init__`); checks that
# involve two sections (the U-Net against the image size, ...) are in `validate`, which
# Config runs. Every message names the offending value.


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _speed_settings(section: str, channels_last: str, compile: str) -> None:
    for name, v in (("channels_last", channels_last), ("compile", compile)):
        _check(v in SPEED_MODES, f"{section}.{name}={v!r} must be one of {SPEED_MODES}")


def _positive_widths(name: str, widths: tuple[int, ...]) -> None:
    _check(
        len(widths) >= 1 and all(isinstance(c, int) and c > 0 for c in widths),
        f"{name}={widths!r} must be positive integer widths",
    )


AMP_MODES = ("none", "bf16", "fp16", "auto")
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
class UNetConfig:
    """pDDPM / ADM diffusion U-Net (docs/method.md §Networks)."""

    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 3
    # Global self-attention in encoder and decoder at these downsampling factors
    # (1 = full resolution, 2 = H/2, 4 = H/4). The middle block always has one.
    attention_levels: tuple[int, ...] = (2, 4)  # Table 2 "Att." (the published MAEDiff)
    num_head_channels: int = 64
    norm_groups: int = 32
    dropout: float = 0.0
    # Feed the visible region x^_0 and the patch mask as two extra input channels
    # (paper Eq. 8-9 leave this open; off = the noised image alone, docs/method.md §Networks).
    condition_channels: bool = False
    # width of each up-sampling residual block: "same" (ADM, pDDPM: the coarser level's)
    # or "next" (the finer level's, which the blocks after it have anyway); at the `cpu`
    # scale "same" puts a third of the FLOPs into one block at H/2 -> H
    up_width: str = "same"

    def __post_init__(self) -> None:
        _check(
            self.up_width in ("same", "next"),
            f"unet.up_width={self.up_width!r} must be 'same' or 'next'",
        )
        _check(
            self.model_channels > 0 and len(self.channel_mult) > 0,
            f"unet.channel_mult={self.channel_mult!r} must be non-empty",
        )
        levels = {2**i for i in range(len(self.channel_mult))}
        # attention runs at the listed levels and in the middle block (the deepest level)
        attended = {len(self.channel_mult) - 1} | {
            i for i in range(len(self.channel_mult)) if 2**i in self.attention_levels
        }
        for i, w in enumerate(self.model_channels * k for k in self.channel_mult):
            _check(
                w % self.norm_groups == 0,
                f"unet.norm_groups={self.norm_groups} does not divide channel width {w}",
            )
            _check(
                i not in attended or w % self.num_head_channels == 0,
                f"unet.num_head_channels={self.num_head_channels} does not divide channel width {w} (attention at level {2**i})",
            )
        for a in self.attention_levels:
            _check(
                a in levels,
                f"unet.attention_levels entry {a} is not one of the U-Net's downsampling factors {sorted(levels)}",
            )
        _check(self.num_res_blocks >= 1, f"unet.num_res_blocks={self.num_res_blocks} must be >= 1")
        _check(0.0 <= self.dropout < 1.0, f"unet.dropout={self.dropout} must be in [0, 1)")


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
    # Zero-initialise the last upsampling layer, so that the branch adds nothing at step 0
    # and MAEDiff starts as the plain U-Net (as ControlNet-style adapters do). Off: the
    # paper's description, whose random upsampler perturbs f from the first step.
    zero_init: bool = False
    # Beyond the paper (docs/method.md §MAE token variants), both off by default:
    # tokens: what the encoder's visible tokens are cut from. "features" (the paper): the
    # U-Net encoder feature map f of the noised input, whose visible cells depend on the
    # noised patch through the convolutions' receptive field; "clean": the clean visible
    # region x^_0 itself (the r x r pixels of each visible cell), independent of the patch.
    tokens: str = "features"
    # token_norm: LayerNorm on the token embeddings before the position embedding is added
    # (a linear patchify of f starts about a sixth of the sin-cos embedding's size)
    token_norm: bool = False

    def __post_init__(self) -> None:
        _check(
            self.tokens in ("features", "clean"),
            f"mae.tokens={self.tokens!r} must be 'features' or 'clean'",
        )
        _check(
            self.enc_dim % self.enc_heads == 0,
            f"mae.enc_heads={self.enc_heads} does not divide mae.enc_dim={self.enc_dim}",
        )
        _check(
            self.dec_dim % self.dec_heads == 0,
            f"mae.dec_heads={self.dec_heads} does not divide mae.dec_dim={self.dec_dim}",
        )
        _check(
            self.enc_depth >= 1 and self.dec_depth >= 1,
            f"mae depths must be >= 1 (enc_depth={self.enc_depth}, dec_depth={self.dec_depth})",
        )


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
    # Reverse steps from t_test at test time. 1: one x0 prediction (MAEDiff, pDDPM and
    # pDDPM's AnoDDPM); >1 (anoddpm only): the original AnoDDPM's iterative sampling.
    sample_steps: int = 1
    # beyond the paper (docs/method.md §Preconditioning): inside the noised patch, feed
    # the network x~_t / sqrt(a^2 sd^2 + b^2 sn^2) and predict x0 as the linear estimate
    # a sd^2 x~_t / (a^2 sd^2 + b^2 sn^2) plus b sn sd / sqrt(...) times the network output
    # (a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar), sd = sigma_data, sn = the noise's std)
    precondition: bool = False
    sigma_data: float = 0.5  # std of the images in the model range [-1, 1]

    def __post_init__(self) -> None:
        _check(self.sigma_data > 0, f"diffusion.sigma_data={self.sigma_data} must be > 0")
        _check(
            self.schedule in ("linear", "cosine"),
            f"diffusion.schedule={self.schedule!r} must be 'linear' or 'cosine'",
        )
        T = self.timesteps
        _check(T >= 2, f"diffusion.timesteps={T} must be >= 2")
        _check(
            0 < self.beta_start < self.beta_end < 1,
            f"diffusion betas must satisfy 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1",
        )
        _check(1 <= self.t_test <= T, f"diffusion.t_test={self.t_test} must be in 1..{T}")
        _check(
            1 <= self.sample_steps <= self.t_test,
            f"diffusion.sample_steps={self.sample_steps} must be in 1..t_test ({self.t_test})",
        )
        _check(
            1 <= self.t_train_min <= self.t_train_max <= T,
            f"diffusion training range t_train_min={self.t_train_min}..t_train_max={self.t_train_max} must lie in 1..{T}",
        )


@dataclass(frozen=True)
class NoiseConfig:
    """Noise of the forward process (paper Alg. 1, docs/method.md §Noise)."""

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

    def __post_init__(self) -> None:
        _check(
            self.kind in ("simplex", "gaussian"),
            f"noise.kind={self.kind!r} must be 'simplex' or 'gaussian'",
        )
        _check(self.octaves >= 1, f"noise.octaves={self.octaves} must be >= 1")
        _check(self.frequency > 0, f"noise.frequency={self.frequency} must be > 0")
        _check(self.bank_size >= 0, f"noise.bank_size={self.bank_size} must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (paper §4.3, docs/method.md §Training)."""

    optimizer: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 1600
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
    amp: str = "none"  # "none", "bf16", "fp16" or "auto" (bf16 where the hardware has it)
    seed: int = 0
    val_every: int = 1  # epochs between validation passes
    checkpoint_every: int = 10  # epochs between "last" checkpoints (and resume points)
    # speed (docs/method.md §Speed): "auto" decides per device, "on" / "off" force it
    channels_last: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.optimizer in ("adam", "adamw"),
            f"train.optimizer={self.optimizer!r} must be 'adam' or 'adamw'",
        )
        _check(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _check(
            self.slices_per_volume >= 1,
            f"train.slices_per_volume={self.slices_per_volume} must be >= 1",
        )
        _check(self.amp in AMP_MODES, f"train.amp={self.amp!r} must be one of {AMP_MODES}")
        _check(
            self.schedule in ("constant", "cosine"),
            f"train.schedule={self.schedule!r} must be 'constant' or 'cosine'",
        )
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]",
        )
        _check(0.0 <= self.ema_decay < 1.0, f"train.ema_decay={self.ema_decay} must be in [0, 1)")
        _speed_settings("train", self.channels_last, self.compile)


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

    def __post_init__(self) -> None:
        _check(0 <= self.fold <= 4, f"data.fold={self.fold} must be in 0..4")
        lo, hi = self.percentiles
        _check(
            0 <= lo < hi <= 100,
            f"data.percentiles={self.percentiles} must satisfy 0 <= low < high <= 100",
        )
        _check(
            len(self.volume_shape) == 3 and self.volume_shape[0] == self.volume_shape[1],
            f"data.volume_shape={self.volume_shape} must have 3 entries with square axial slices",
        )
        _check(
            self.center in ("brain", "image"),
            f"data.center={self.center!r} must be 'brain' or 'image'",
        )
        _check(self.spacing > 0, f"data.spacing={self.spacing} must be > 0")
        _check(
            self.standardise in ("none", "nyul"),
            f"data.standardise={self.standardise!r} must be 'none' or 'nyul'",
        )
        _check(
            not self.landmarks or len(self.landmarks) == len(NYUL_PERCENTILES),
            f"data.landmarks must hold {len(NYUL_PERCENTILES)} values, got {len(self.landmarks)}",
        )
        _check(
            all(a <= b for a, b in zip(self.landmarks, self.landmarks[1:])),
            f"data.landmarks={self.landmarks} must be non-decreasing",
        )


@dataclass(frozen=True)
class InferenceConfig:
    batch_size: int = 64  # (slice, patch) inputs per forward pass in reconstruct()
    amp: str = "none"  # "none", "bf16", "fp16" or "auto" (bf16 where the hardware has it)
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
    channels_last: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        _check(self.amp in AMP_MODES, f"inference.amp={self.amp!r} must be one of {AMP_MODES}")
        _check(self.batch_size >= 1, f"inference.batch_size={self.batch_size} must be >= 1")
        _check(
            self.ensemble_draws >= 1,
            f"inference.ensemble_draws={self.ensemble_draws} must be >= 1",
        )
        _check(
            all(isinstance(t, int) and t >= 1 for t in self.ensemble_t),
            f"inference.ensemble_t={self.ensemble_t} must hold timesteps >= 1",
        )
        _check(
            self.patch_selection in ("all", "guided"),
            f"inference.patch_selection={self.patch_selection!r} must be 'all' or 'guided'",
        )
        _check(
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
        _check(
            0 <= self.probability <= 1, f"augment.probability={self.probability} must be in [0, 1]"
        )
        for name in ("gamma", "noise_std", "blur_sigma"):
            lo, hi = getattr(self, name)
            _check(0 <= lo <= hi, f"augment.{name}={(lo, hi)} must satisfy 0 <= low <= high")
        _check(self.gamma[0] > 0, f"augment.gamma={self.gamma} must be > 0")
        _check(
            self.contrast >= 0 and self.bias_field >= 0,
            "augment.contrast and augment.bias_field must be >= 0",
        )


@dataclass(frozen=True)
class AutoencoderConfig:
    """Convolutional encoder-decoder with a dense bottleneck: AE and VAE (Baur et al.
    2021), and the slice VAE inside SVAE (Behrendt et al. 2022). docs/baselines.md."""

    # widths of the stride-2 stages; Baur's unified encoder: min(128, 32 * 2^i), 4 stages
    channels: tuple[int, ...] = (32, 64, 128, 128)
    kernel_size: int = 5  # of the stride-2 (transposed) convolutions (Baur: 5)
    latent_dim: int = 128  # z (Baur's dense models: zDim = 128)
    loss: str = "l1"  # reconstruction loss: "l1" (Baur) or "l2"
    # VAE / SVAE: weight of KL(q(z|x) || N(0, I)) against the reconstruction error summed
    # over pixels (1.0 = Baur's objective; the loss is then divided by the pixel count)
    kl_weight: float = 1.0
    dropout: float = 0.2  # on the dense bottleneck while training (Baur: 0.2)

    def __post_init__(self) -> None:
        _positive_widths("autoencoder.channels", self.channels)
        _check(
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            f"autoencoder.kernel_size={self.kernel_size} must be odd and >= 1",
        )
        _check(self.latent_dim >= 1, f"autoencoder.latent_dim={self.latent_dim} must be >= 1")
        _check(self.loss in ("l1", "l2"), f"autoencoder.loss={self.loss!r} must be 'l1' or 'l2'")
        _check(self.kl_weight >= 0, f"autoencoder.kl_weight={self.kl_weight} must be >= 0")
        _check(0 <= self.dropout < 1, f"autoencoder.dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class SVAEConfig:
    """Transformer over the slice latents of one volume (Behrendt et al. 2022)."""

    depth: int = 4  # transformer blocks
    heads: int = 8  # attention heads; must divide autoencoder.latent_dim
    mlp_ratio: float = 4.0  # hidden width of the block MLP / latent_dim
    dropout: float = 0.1  # on the residual branches while training

    def __post_init__(self) -> None:
        _check(self.depth >= 1, f"svae.depth={self.depth} must be >= 1")
        _check(self.heads >= 1, f"svae.heads={self.heads} must be >= 1")
        _check(self.mlp_ratio > 0, f"svae.mlp_ratio={self.mlp_ratio} must be > 0")
        _check(0 <= self.dropout < 1, f"svae.dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class DAEConfig:
    """Denoising U-Net with coarse noise (Kascenas et al. 2022)."""

    noise_res: int = 16  # Gaussian noise drawn at noise_res x noise_res, upsampled
    noise_std: float = 0.2  # std of that noise (intensities in [0, 1])
    # U-Net widths per level (Kascenas: depth 4, first width 2^6 = 64, doubling)
    channels: tuple[int, ...] = (64, 128, 256, 512)

    def __post_init__(self) -> None:
        _positive_widths("dae.channels", self.channels)
        _check(self.noise_res >= 1, f"dae.noise_res={self.noise_res} must be >= 1")
        _check(self.noise_std >= 0, f"dae.noise_std={self.noise_std} must be >= 0")


@dataclass(frozen=True)
class FAnoGANConfig:
    """WGAN-GP then an izi_f encoder (Schlegl et al. 2019)."""

    latent_dim: int = 128  # z (Schlegl: ZDIM = 128)
    # input-conv width, then the output width of each residual (re)sampling block of the
    # critic and encoder; the generator mirrors it (Schlegl, DIM = 64: 64, 128, 256, 512, 512)
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    n_critic: int = 5  # critic updates per generator update
    gp_weight: float = 10.0  # lambda of the gradient penalty
    feature_weight: float = 1.0  # kappa of the izi_f loss
    gan_fraction: float = 0.7  # share of the training budget spent on the WGAN stage
    beta1: float = 0.0  # Adam betas of the GAN stage (WGAN-GP: 0.0, 0.9)
    beta2: float = 0.9
    encoder_lr: float = 5e-5  # learning rate of the encoder stage (Schlegl: 5e-5)

    def __post_init__(self) -> None:
        _positive_widths("fanogan.channels", self.channels)
        _check(
            len(self.channels) >= 2, f"fanogan.channels={self.channels!r} needs at least 2 entries"
        )
        _check(self.latent_dim >= 1, f"fanogan.latent_dim={self.latent_dim} must be >= 1")
        _check(self.n_critic >= 1, f"fanogan.n_critic={self.n_critic} must be >= 1")
        _check(self.gp_weight >= 0, f"fanogan.gp_weight={self.gp_weight} must be >= 0")
        _check(
            self.feature_weight >= 0, f"fanogan.feature_weight={self.feature_weight} must be >= 0"
        )
        _check(
            0.0 < self.gan_fraction < 1.0,
            f"fanogan.gan_fraction={self.gan_fraction} must be in (0, 1)",
        )
        _check(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
            f"fanogan betas ({self.beta1}, {self.beta2}) must be in [0, 1)",
        )
        _check(self.encoder_lr > 0, f"fanogan.encoder_lr={self.encoder_lr} must be > 0")


@dataclass(frozen=True)
class Config:
    name: str = "paper"
    model: str = "maediff"  # key of the model registry (maediff.models.MODELS)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    svae: SVAEConfig = field(default_factory=SVAEConfig)
    dae: DAEConfig = field(default_factory=DAEConfig)
    fanogan: FAnoGANConfig = field(default_factory=FAnoGANConfig)

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------- validation


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


MODEL_KINDS = ("maediff", "anoddpm", "thresh", "ae", "vae", "svae", "dae", "fanogan")
# kinds registered by models of other packages (entry point group `maediff.models`,
# docs/plugins.md): models.register_model adds them
PLUGIN_KINDS: list[str] = []


def register_kind(kind: str) -> None:
    if kind not in MODEL_KINDS and kind not in PLUGIN_KINDS:
        PLUGIN_KINDS.append(kind)


def _known_kinds() -> tuple[str, ...]:
    if not PLUGIN_KINDS:  # a saved run of a plug-in model: its package registers it
        import importlib

        importlib.import_module("maediff.models")
    return (*MODEL_KINDS, *PLUGIN_KINDS)


def validate(cfg: Config) -> None:
    """Checks across sections (each section checks its own values when built)."""
    g, u, d = cfg.geometry, cfg.unet, cfg.diffusion
    H, p = g.image_size, g.patch_size
    if cfg.model not in MODEL_KINDS:
        kinds = _known_kinds()
        _check(cfg.model in kinds, f"model={cfg.model!r} must be one of {kinds}")
    downs = 2 ** (len(u.channel_mult) - 1)
    _check(
        H % downs == 0, f"image_size {H} must be divisible by the U-Net downsampling factor {downs}"
    )
    if cfg.mae.enabled and cfg.model == "maediff":
        _check(
            downs == 4,
            f"the MAE needs the U-Net encoder output at H/4, but channel_mult={u.channel_mult} gives H/{downs}",
        )
        _check(
            p < H,
            f"with the MAE enabled the patch (p={p}) must leave visible cells in the image ({H})",
        )
    inf = cfg.inference
    _check(
        inf.patch_selection == "all" or cfg.model == "maediff",
        f"inference.patch_selection='guided' is a MAEDiff / pDDPM option (model={cfg.model!r})",
    )
    if inf.patch_selection == "guided":
        _check(
            (H - p) % p == 0 and p % g.stride == 0,
            f"guided patch selection tiles the slice with the patches at stride p: needs "
            f"(image_size - patch_size) % patch_size == 0 and patch_size % stride == 0 ({g})",
        )
    _check(
        (not inf.ensemble_t and inf.ensemble_draws == 1) or cfg.model == "maediff",
        f"noise ensembles (inference.ensemble_t / ensemble_draws) are a MAEDiff / pDDPM option (model={cfg.model!r})",
    )
    _check(
        d.sample_steps == 1 or cfg.model == "anoddpm",
        f"diffusion.sample_steps={d.sample_steps}: iterative sampling is an AnoDDPM option (model={cfg.model!r})",
    )
    a = cfg.autoencoder
    _check(
        a.latent_dim % cfg.svae.heads == 0,
        f"svae.heads={cfg.svae.heads} must divide autoencoder.latent_dim={a.latent_dim}",
    )
    _check(
        cfg.dae.noise_res <= H,
        f"dae.noise_res={cfg.dae.noise_res} must be in 1..image_size ({H})",
    )
    downsampling = {  # image-size checks only for the model that uses the section
        "ae": ("autoencoder.channels", len(a.channels)),
        "vae": ("autoencoder.channels", len(a.channels)),
        "svae": ("autoencoder.channels", len(a.channels)),
        "dae": ("dae.channels", len(cfg.dae.channels) - 1),
        "fanogan": ("fanogan.channels", len(cfg.fanogan.channels) - 1),
    }
    if cfg.model in downsampling:
        name, n = downsampling[cfg.model]
        _check(
            H % 2**n == 0,
            f"image_size {H} must be divisible by 2^{n} = {2**n}, the downsampling of {name}",
        )


# --------------------------------------------------------------------------- presets
#
# A preset is a model (a row of the paper's Table 1 or 2) at a scale. The model is a
# small delta over the paper's MAEDiff (Config()); the scale is one function applied to
# any model: `paper` (the published sizes), `cpu` (trains in minutes on 2 cores) and
# `tiny` (unit tests). Preset names: MODEL (paper scale), MODEL-cpu, MODEL-tiny.


def _unet(cfg: Config, **kw: Any) -> Config:
    return replace(cfg, unet=replace(cfg.unet, **kw))


def _diffusion_variant(
    cfg: Config, *, mae: bool, attention: bool, stride: int | None = None
) -> Config:
    """Table 2: U-Net (+ global attention at H/2, H/4) (+ MAE); pDDPM = U-Net, no MAE."""
    cfg = replace(cfg, mae=replace(cfg.mae, enabled=mae))
    cfg = _unet(cfg, attention_levels=(2, 4) if attention else ())
    return replace(cfg, geometry=replace(cfg.geometry, stride=stride or cfg.geometry.stride))


def _anoddpm(cfg: Config) -> Config:
    """AnoDDPM as pDDPM reimplements it: the same U-Net and training, the whole slice
    noised (one patch covering the image), reconstructed from t_test."""
    cfg = _diffusion_variant(cfg, mae=False, attention=False)
    g = cfg.geometry
    return replace(cfg, model="anoddpm", geometry=replace(g, patch_size=g.image_size))


MODEL_DELTAS: dict[str, Any] = {
    "thresh": lambda c: replace(c, model="thresh"),
    "ae": lambda c: replace(c, model="ae"),
    "vae": lambda c: replace(c, model="vae"),
    # a batch is whole volumes: 4 volumes of 50 slices = 200 slices per step
    "svae": lambda c: replace(c, model="svae", train=replace(c.train, batch_size=4)),
    # Kascenas et al.: Adam with weight decay 1e-5 (their AMSGrad variant is not offered)
    "dae": lambda c: replace(c, model="dae", train=replace(c.train, weight_decay=1e-5)),
    "fanogan": lambda c: replace(c, model="fanogan"),
    "anoddpm": _anoddpm,
    "pddpm-s48": lambda c: _diffusion_variant(c, mae=False, attention=False, stride=48),
    "pddpm-s16": lambda c: _diffusion_variant(c, mae=False, attention=False, stride=16),
    "maediff": lambda c: c,  # = Table 2 "U-Net + Att. + MAE" (the published numbers)
    "ablation-unet": lambda c: _diffusion_variant(c, mae=False, attention=False),
    "ablation-unet-att": lambda c: _diffusion_variant(c, mae=False, attention=True),
    "ablation-unet-mae": lambda c: _diffusion_variant(c, mae=True, attention=False),
    "ablation-unet-att-mae": lambda c: _diffusion_variant(c, mae=True, attention=True),
}
# Row names of the paper's tables
DISPLAY_NAMES = {
    "thresh": "Thresh",
    "ae": "AE",
    "vae": "VAE",
    "svae": "SVAE",
    "dae": "DAE",
    "fanogan": "f-AnoGAN",
    "anoddpm": "AnoDDPM",
    "pddpm-s48": "pDDPM s48",
    "pddpm-s16": "pDDPM s16",
    "maediff": "MAEDiff",
    "ablation-unet": "U-Net",
    "ablation-unet-att": "U-Net + Att.",
    "ablation-unet-mae": "U-Net + MAE",
    "ablation-unet-att-mae": "U-Net + Att. + MAE",
}
TABLE1 = (
    "thresh",
    "ae",
    "vae",
    "svae",
    "dae",
    "fanogan",
    "anoddpm",
    "pddpm-s48",
    "pddpm-s16",
    "maediff",
)
TABLE2 = ("ablation-unet", "ablation-unet-att", "ablation-unet-mae", "ablation-unet-att-mae")


def _rescale_geometry(g: GeometryConfig, size: int, grid: int) -> GeometryConfig:
    """The same partition (patch and stride as fractions of the slice) at `size` pixels."""

    def scaled(v: int) -> int:
        return max(grid, round(v * size / g.image_size / grid) * grid)

    return GeometryConfig(size, scaled(g.patch_size), scaled(g.stride), grid)


# The `cpu` scale's training budget in steps: the same model on every machine (the
# demo and `benchmark --scale cpu`). Chosen from measurements of quality per CPU-minute
# on 2 fp32 cores (docs/results.md, "How the cpu scale was chosen").
CPU_STEPS = 300


def with_update_budget(cfg: Config, updates: int) -> Config:
    """The step budget that gives each part producing the reconstruction `updates`
    optimizer updates (docs/baselines.md §Budgets): the unit every model of a table
    shares. One step updates one part; most models have one part, so steps = updates.
    f-AnoGAN cycles n_critic critic steps and one generator step, then trains its
    encoder: (n_critic + 1) * updates GAN steps, then `updates` encoder steps."""
    if updates < 1:
        raise ValueError(f"the update budget must be >= 1, got {updates}")
    t = replace(cfg.train, max_steps=updates, max_minutes=0.0, epochs=max(cfg.train.epochs, 100000))
    if cfg.model == "fanogan":
        gan = (cfg.fanogan.n_critic + 1) * updates
        t = replace(t, max_steps=gan + updates)
        cfg = replace(cfg, fanogan=replace(cfg.fanogan, gan_fraction=gan / (gan + updates)))
    return replace(cfg, train=t)


def _cpu_scale(cfg: Config) -> Config:
    """The paper's structure (K=16, N=36, global attention at H/2 and H/4, the MAE) at
    48x48 with narrow networks: a demo in about 12 minutes on 2 fp32 cores.

    U-Net widths 16, 32, 64 (multipliers 1, 2, 4) with one residual block per level and
    up-sampling blocks at the finer level's width: 0.49 GFLOP per (slice, patch) pair,
    a third of the previous 32 x (1, 2, 2) with ADM's up-sampling widths (1.49), whose
    H/2 -> H block alone was a third of the cost. Adam with warm-up and cosine decay
    over the step budget and an EMA of the weights."""
    cfg = replace(
        cfg,
        geometry=_rescale_geometry(cfg.geometry, 48, 8),
        unet=replace(
            cfg.unet,
            model_channels=16,
            channel_mult=(1, 2, 4),
            num_res_blocks=1,
            num_head_channels=32,
            norm_groups=8,
            up_width="next",
        ),
        mae=replace(
            cfg.mae, enc_dim=128, enc_depth=4, enc_heads=4, dec_dim=128, dec_depth=2, dec_heads=4
        ),
        # 48x48 slices of the protocol's 96x96: double the per-pixel frequency so the
        # noise keeps the physical scale of the paper's 2^-6 at 96x96
        noise=replace(cfg.noise, frequency=2.0 * cfg.noise.frequency),
        train=replace(
            cfg.train,
            lr=1e-3,
            schedule="cosine",
            warmup_steps=30,
            ema_decay=0.995,
            epochs=100000,
            max_steps=CPU_STEPS,
            max_minutes=0.0,
            amp="auto",
            val_every=10,
        ),
        inference=replace(cfg.inference, batch_size=32, amp="auto"),
        autoencoder=replace(cfg.autoencoder, channels=(16, 32, 64, 64), latent_dim=64),
        svae=replace(cfg.svae, depth=2, heads=4),
        # same noise cell size in pixels (6) as 16 cells at 96x96
        dae=replace(cfg.dae, noise_res=cfg.dae.noise_res // 2, channels=(8, 16, 32, 64)),
        # encoder lr: half the GAN's train.lr, as Schlegl's 5e-5 vs 1e-4
        fanogan=replace(cfg.fanogan, latent_dim=64, channels=(8, 16, 32, 64, 64), encoder_lr=5e-4),
    )
    # the same number of updates of every reconstructing part, for every model
    return with_update_budget(cfg, CPU_STEPS)


def _tiny_scale(cfg: Config) -> Config:
    """Smallest useful configuration: unit tests, the end-to-end tests and a benchmark
    that fits a slow laptop. The diffusion schedule stays the paper's (T = 1000,
    t_test = 500): a shorter schedule with the same betas hardly noises the input
    (alpha_bar(10) = 0.95 at T = 20), and the diffusion models then reconstruct the
    lesions too."""
    return replace(
        cfg,
        geometry=_rescale_geometry(cfg.geometry, 32, 8),
        unet=replace(
            cfg.unet, model_channels=16, num_res_blocks=1, num_head_channels=16, norm_groups=8
        ),
        mae=replace(
            cfg.mae, enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=2, dec_heads=2
        ),
        train=replace(cfg.train, lr=1e-3, batch_size=8, epochs=2),
        data=replace(cfg.data, volume_shape=(32, 32, 8), spacing=6.0),
        inference=replace(cfg.inference, batch_size=64),
        autoencoder=replace(cfg.autoencoder, channels=(8, 16, 32), latent_dim=32),
        svae=replace(cfg.svae, depth=1, heads=2),
        dae=replace(cfg.dae, noise_res=4, channels=(8, 16, 32)),
        fanogan=replace(cfg.fanogan, latent_dim=16, channels=(8, 8, 16, 16), encoder_lr=1e-2),
    )


SCALES: dict[str, Any] = {"paper": lambda c: c, "cpu": _cpu_scale, "tiny": _tiny_scale}
ALIASES = {"paper": "maediff", "cpu": "maediff-cpu", "tiny": "maediff-tiny"}


def preset_name(model: str, scale: str = "paper") -> str:
    return model if scale == "paper" else f"{model}-{scale}"


def split_preset_name(name: str) -> tuple[str, str]:
    """'dae-cpu' -> ('dae', 'cpu'); aliases resolved ('cpu' -> ('maediff', 'cpu'))."""
    name = ALIASES.get(name, name)
    for scale in SCALES:
        if scale != "paper" and name.endswith(f"-{scale}"):
            return name[: -len(scale) - 1], scale
    return name, "paper"


def display_name(cfg: Config) -> str:
    """The table row of a configuration: its preset's row name, else the model's."""
    base, _ = split_preset_name(cfg.name)
    return DISPLAY_NAMES.get(base) or DISPLAY_NAMES.get(cfg.model, cfg.name)


def _build_presets() -> dict[str, Any]:
    presets: dict[str, Any] = {}
    for model, delta in MODEL_DELTAS.items():
        for scale, fn in SCALES.items():
            name = preset_name(model, scale)
            presets[name] = lambda d=delta, f=fn, n=name: replace(f(d(Config())), name=n)
    for alias, target in ALIASES.items():
        presets[alias] = lambda t=target, a=alias: replace(presets[t](), name=a)
    return presets


PRESETS = _build_presets()


def register_preset(model: str, delta: Any, row: str) -> None:
    """Presets MODEL, MODEL-cpu and MODEL-tiny for a model of another package: `delta`
    maps the shared default configuration to this model's (at least `model=`), `row` is
    its name in tables. The scales apply on top, as for the built-in models."""
    if model in MODEL_DELTAS:
        raise ValueError(f"a preset named {model!r} exists already")
    if not row or row in DISPLAY_NAMES.values():
        raise ValueError(f"row name {row!r} is empty or taken")
    MODEL_DELTAS[model] = delta
    DISPLAY_NAMES[model] = row
    for scale, fn in SCALES.items():
        name = preset_name(model, scale)
        PRESETS[name] = lambda d=delta, f=fn, n=name: replace(f(d(Config())), name=n)


def get_preset(name: str) -> Config:
    if name not in PRESETS:  # a plug-in's preset: importing the models loads the plug-ins
        import importlib

        importlib.import_module("maediff.models")
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
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
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
    g, a = cfg.geometry, cfg.autoencoder
    size = f"{cfg.name} ({cfg.model}): {g.image_size}x{g.image_size}"
    if cfg.model in ("ae", "vae", "svae"):
        return f"{size}, conv {list(a.channels)}, z={a.latent_dim}"
    if cfg.model == "fanogan":
        return f"{size}, WGAN-GP + izi_f encoder, widths {list(cfg.fanogan.channels)}, z={cfg.fanogan.latent_dim}"
    if cfg.model == "dae":
        return f"{size}, U-Net {list(cfg.dae.channels)}, coarse noise {cfg.dae.noise_res}x{cfg.dae.noise_res} std {cfg.dae.noise_std}"
    if cfg.model == "thresh":
        return size
    return (
        f"{cfg.name}: {g.image_size}x{g.image_size}, p={g.patch_size} s={g.stride} r={g.grid_size} "
        f"(K={g.num_patches}, N={g.num_cells}), U-Net {cfg.unet.model_channels}x{list(cfg.unet.channel_mult)}"
        f" x{cfg.unet.num_res_blocks}, att={list(cfg.unet.attention_levels)}, MAE={'on' if cfg.mae.enabled else 'off'}, "
        f"{cfg.diffusion.schedule} T={cfg.diffusion.timesteps} t_test={cfg.diffusion.t_test}, noise={cfg.noise.kind}"
    )


__all__ = [
    "DISPLAY_NAMES",
    "register_preset",
    "with_update_budget",
    "TABLE1",
    "TABLE2",
    "AutoencoderConfig",
    "Config",
    "DAEConfig",
    "FAnoGANConfig",
    "SVAEConfig",
    "DataConfig",
    "DiffusionConfig",
    "GeometryConfig",
    "AugmentConfig",
    "InferenceConfig",
    "NYUL_PERCENTILES",
    "MAEConfig",
    "NoiseConfig",
    "PRESETS",
    "TrainConfig",
    "UNetConfig",
    "apply_overrides",
    "describe",
    "display_name",
    "preset_name",
    "split_preset_name",
    "from_dict",
    "get_preset",
    "load_config",
    "save_config",
    "to_dict",
    "validate",
    "validate_geometry",
]
