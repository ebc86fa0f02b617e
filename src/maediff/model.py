"""MAEDiff: patch-wise training (paper Alg. 1) and sequential patch-wise
reconstruction (paper Alg. 2) around a U-Net with an optional MAE branch.

Images enter and leave in [0, 1]; the diffusion runs on [-1, 1] (PROTOCOL.md §2).

    model = MAEDiff(get_preset("cpu"))
    loss = model.loss(x0, generator=g)                      # x0: (B, 1, H, W)
    rec = model.reconstruct(slices, generator=g)            # slices: (S, 1, H, W)
    anomaly = (slices - rec).abs()                          # paper Alg. 2 line 14
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import Config
from .diffusion import GaussianDiffusion
from .noise import NoiseSampler
from .patches import PatchGrid
from .unet import UNet


def to_model_range(x: Tensor) -> Tensor:
    return x * 2 - 1


def from_model_range(x: Tensor) -> Tensor:
    return (x + 1) / 2


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


class MAEDiff(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        g = cfg.geometry
        self.net = UNet(cfg.unet, g, cfg.mae if cfg.mae.enabled else None)
        self.diffusion = GaussianDiffusion(cfg.diffusion)
        self.grid = PatchGrid(g)
        self.noise = NoiseSampler(cfg.noise, (g.image_size, g.image_size))
        self.register_buffer(
            "patch_masks", self.grid.patch_masks(), persistent=False
        )  # (K, 1, H, W)
        self.register_buffer("masked_cells", self.grid.masked_cells(), persistent=False)  # (K, N)

    @property
    def device(self) -> torch.device:
        return self.patch_masks.device

    # ------------------------------------------------------------------ one network call

    def denoise(self, x_tilde: Tensor, t: Tensor, k: Tensor, x0: Tensor) -> Tensor:
        """p_theta(x~_t, x^_0, t) for patch positions k: (B, 1, H, W) -> x0 estimate.

        x0 (model range) supplies the visible region x^_0 = x0 * (1 - M_p) when the
        U-Net takes condition channels; the MAE sees only the cells outside patch k.
        """
        visible = ~self.masked_cells[k] if self.net.mae is not None else None
        cond = None
        if self.cfg.unet.condition_channels:
            m = self.patch_masks[k].to(x0.dtype)
            cond = torch.cat([x0 * (1 - m), m], dim=1)
        return self.net(x_tilde, t.to(x_tilde.device), visible, cond)

    def noised_input(self, x0: Tensor, x_t: Tensor, k: Tensor) -> Tensor:
        """Paper Eq. 8: x~_t = x_t inside patch k, x0 outside (bit-exact)."""
        return torch.where(self.patch_masks[k] > 0, x_t, x0)

    # ------------------------------------------------------------------ Alg. 1

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One patch-wise training objective (paper Alg. 1, Eq. 9).

        x0: (B, 1, H, W) in [0, 1]. Per sample: t ~ U{t_min..t_max}, a noise field,
        one random patch position; l1 between x0 and the prediction, averaged over
        the pixels inside the noised patch.
        """
        self._check_images(x0)
        B = x0.shape[0]
        x = to_model_range(x0)
        t = self.diffusion.sample_timesteps(B, generator).to(x.device)
        eps = self.noise(B, generator, device=x.device, dtype=x.dtype)
        x_t = self.diffusion.q_sample(x, t, eps)
        k = torch.randint(self.grid.num_patches, (B,), generator=generator).to(x.device)
        pred = self.denoise(self.noised_input(x, x_t, k), t, k, x)
        m = self.patch_masks[k]
        return ((x - pred.float()).abs() * m).sum() / m.sum()

    def forward(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The training objective, so that DistributedDataParallel can wrap the model."""
        return self.loss(x0, generator)

    # ------------------------------------------------------------------ Alg. 2

    @torch.no_grad()
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
        """Healthy reconstruction of every slice (paper Alg. 2) at t = t_test.

        slices: (S, 1, H, W) in [0, 1] -> (S, 1, H, W) in [0, 1]. Each slice gets one
        noise field (or `noise`, (S, 1, H, W)); every (slice, patch) pair is denoised,
        `batch_size` pairs per forward pass; overlapping predictions are averaged
        (sum and count over all patches, divided once). `progress(n)` is called with the
        number of pairs finished after each pass.

        brain_mask (S, 1, H, W), optional: pairs whose patch holds no brain pixel are
        skipped and their pixels keep the input. Every patch covering a brain pixel
        holds that pixel, so brain pixels get exactly the full Alg. 2 result.
        """
        self._check_images(slices)
        S = slices.shape[0]
        dev = self.device
        K = self.grid.num_patches
        batch_size = batch_size or self.cfg.inference.batch_size
        amp = resolve_amp(amp or self.cfg.inference.amp, dev)
        x = to_model_range(slices.to(dev, torch.float32))
        if noise is None:
            noise = self.noise(S, generator, device=dev)
        elif noise.shape != slices.shape:
            raise ValueError(
                f"noise must have the shape of the slices {tuple(slices.shape)}, got {tuple(noise.shape)}"
            )
        t_all = torch.full((S,), self.cfg.diffusion.t_test, dtype=torch.long)
        x_t = self.diffusion.q_sample(x, t_all, noise.to(dev, torch.float32))
        patches = self.grid.extract(x)  # (S, K, 1, p, p); skipped pairs keep the input
        if brain_mask is None:
            pairs = torch.arange(S * K, device=dev)
        else:
            if brain_mask.shape != slices.shape:
                raise ValueError(
                    f"brain_mask must have the shape of the slices {tuple(slices.shape)}, got {tuple(brain_mask.shape)}"
                )
            has_brain = (
                self.grid.extract(brain_mask.to(dev, torch.float32)).flatten(2).amax(-1) > 0
            )  # (S, K)
            pairs = torch.nonzero(has_brain.flatten()).flatten()
        for chunk in pairs.split(batch_size):
            s, k = chunk // K, chunk % K
            t = torch.full((len(chunk),), self.cfg.diffusion.t_test, dtype=torch.long, device=dev)
            with autocast_context(dev, amp):
                pred = self.denoise(self.noised_input(x[s], x_t[s], k), t, k, x[s])
            patches[s, k] = self.grid.crop(pred.float(), k)
            if progress is not None:
                progress(len(chunk))
        return from_model_range(self.grid.stitch(patches))

    def _check_images(self, x: Tensor) -> None:
        H = self.cfg.geometry.image_size
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2:] != (H, H):
            raise ValueError(f"expected images of shape (B, 1, {H}, {H}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")


__all__ = ["MAEDiff", "autocast_context", "from_model_range", "resolve_amp", "to_model_range"]
