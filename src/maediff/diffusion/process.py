"""The forward diffusion process, separate from any network (paper §3.1).

Schedules are computed in float64 and gathered into the dtype of the data.
Timesteps are 1-based as in the paper: t in {1, ..., T}, and
alpha_bar(t) = prod_{s=1..t} (1 - beta_s) = alphas_cumprod[t - 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..device import to_device
from ..registry import check, register_section


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
    # beyond the paper: weight of the background pixels (x0 = 0, outside the skull-
    # stripped brain) in the l1 of Eq. 9 inside the noised patch; 1 counts every pixel
    # alike (the paper), 0 counts the brain only
    background_weight: float = 1.0
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
        check(
            0.0 <= self.background_weight <= 1.0,
            f"diffusion.background_weight={self.background_weight} must be in [0, 1]",
        )
        check(self.sigma_data > 0, f"diffusion.sigma_data={self.sigma_data} must be > 0")
        check(
            self.schedule in ("linear", "cosine"),
            f"diffusion.schedule={self.schedule!r} must be 'linear' or 'cosine'",
        )
        T = self.timesteps
        check(T >= 2, f"diffusion.timesteps={T} must be >= 2")
        check(
            0 < self.beta_start < self.beta_end < 1,
            f"diffusion betas must satisfy 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1",
        )
        check(1 <= self.t_test <= T, f"diffusion.t_test={self.t_test} must be in 1..{T}")
        check(
            1 <= self.sample_steps <= self.t_test,
            f"diffusion.sample_steps={self.sample_steps} must be in 1..t_test ({self.t_test})",
        )
        check(
            1 <= self.t_train_min <= self.t_train_max <= T,
            f"diffusion training range t_train_min={self.t_train_min}..t_train_max={self.t_train_max} must lie in 1..{T}",
        )


# The schedule is the paper's at every scale (see scales._tiny_scale). The `cpu` scale
# trains at the noise levels the test uses and on the brain (docs/history/0.8.0.md, "A recipe
# that learns faster": both raised validation Dice at 300 steps over 3 seeds); the
# `paper` scale keeps the paper's t ~ U{1..T} and plain l1.
CPU_TRAINING = {"t_train_min": 350, "t_train_max": 650, "background_weight": 0.1}
register_section("diffusion", DiffusionConfig, cpu=lambda d: replace(d, **CPU_TRAINING))


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """beta_t evenly spaced from beta_start to beta_end (paper §4.3), float64 (T,)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021; used by the pDDPM code), float64 (T,).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2);
    beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta).
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def _shape_like(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) in the dtype of `like`, broadcastable to it."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """Schedule quantities and the closed-form forward process q(x_t | x_0).

    The network is never held here; methods take tensors only.
    """

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.timesteps
        if cfg.schedule == "linear":
            betas = linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        elif cfg.schedule == "cosine":
            betas = cosine_betas(cfg.timesteps, cfg.cosine_s)
        else:
            raise ValueError(f"unknown schedule {cfg.schedule!r}")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]]
        )
        # Var of q(x_{t-1} | x_t, x_0) (paper §3.1): beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        ab = self.alphas_cumprod
        # the float64 (T,) tables the steps gather from, by name; each is copied once to
        # each device that asks for it (`_table`), so that a step on a GPU gathers there
        # from t, copied without blocking, rather than on the CPU with a blocking copy
        self.tables = {
            "sqrt_ab": ab.sqrt(),
            "sqrt_one_minus_ab": (1.0 - ab).sqrt(),
            "ab_from_0": torch.cat([torch.ones(1, dtype=torch.float64), ab]),  # [0] = 1
        }
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    def _table(self, name: str, device: torch.device) -> Tensor:
        """Table `name` on `device` (copied there once, then kept)."""
        if device.type == "cpu":
            return self.tables[name]
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = self.tables[name].to(device)
        return self._on_device[key]

    def _gather(self, name: str, index: Tensor, like: Tensor, offset: int = -1) -> Tensor:
        """table[index + offset] as a (B, 1, ..., 1) tensor like `like`, gathered on its
        device (index: 1-based t with offset -1, or t' itself with offset 0)."""
        dev = like.device
        idx = to_device(index.long(), dev) + offset
        return _shape_like(self._table(name, dev)[idx], like)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar(t) for 1-based t, float64 (B,)."""
        self._check_t(t)
        return self.alphas_cumprod[t.long().cpu() - 1]

    def _check_t(self, t: Tensor) -> None:
        """1 <= t <= T. Free for a CPU t; a t on a GPU is read back (the GPU waits), so
        the models pass the CPU draws here and move t to the device afterwards."""
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in 1..{self.num_timesteps}, got {int(t.min())}..{int(t.max())}"
            )

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Paper Eq. 3: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        x0, noise: (B, C, H, W); t: (B,) 1-based.
        """
        self._check_t(t)
        a, b = self.coefficients(t, x0)
        return a * x0 + b * noise

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) as (B, 1, ..., 1) tensors like `like`."""
        return (
            self._gather("sqrt_ab", t, like),
            self._gather("sqrt_one_minus_ab", t, like),
        )

    def posterior_step(
        self, x_t: Tensor, t: Tensor, t_prev: Tensor, x0: Tensor, noise: Tensor
    ) -> Tensor:
        """Draw x_{t'} ~ q(x_{t'} | x_t, x_0) for any 0 <= t' < t (a DDPM step; t' = t - 1
        gives paper Eq. 5-6 with the x0 parameterisation). With a = alpha_bar:

            mean = sqrt(a_t') (1 - a_t/a_t') / (1 - a_t) x_0 + sqrt(a_t/a_t') (1 - a_t') / (1 - a_t) x_t
            var  = (1 - a_t') (1 - a_t/a_t') / (1 - a_t)

        t' = 0 returns x_0 (alpha_bar(0) = 1, zero variance).
        """
        self._check_t(t)
        a_t = self._gather("ab_from_0", t, x_t, offset=0).double()  # ab[t - 1] = ab_from_0[t]
        a_p = self._gather("ab_from_0", t_prev, x_t.double(), offset=0)
        ratio = a_t / a_p
        c0 = a_p.sqrt() * (1 - ratio) / (1 - a_t)
        ct = ratio.sqrt() * (1 - a_p) / (1 - a_t)
        var = (1 - a_p) * (1 - ratio) / (1 - a_t)
        out = c0 * x0.double() + ct * x_t.double() + var.clamp(min=0).sqrt() * noise.double()
        return out.to(x_t.dtype)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps t ~ U{t_train_min .. t_train_max} (paper Alg. 1 line 3): (n,) long."""
        lo, hi = self.cfg.t_train_min, self.cfg.t_train_max
        return torch.randint(lo, hi + 1, (n,), generator=generator)


__all__ = ["GaussianDiffusion", "cosine_betas", "linear_betas"]
