"""AnoDDPM (Wyatt et al. 2022) as pDDPM and the MAEDiff paper reimplement it: the
U-Net and training of the patch diffusion model with one "patch" that covers the
whole slice, so every pixel is noised with simplex noise and predicted (x0, l1).

Reconstruction starts from x_t at t_test. With diffusion.sample_steps = 1 (default,
the reimplementation) one x0 prediction is the reconstruction. With more steps the
original's iterative reverse process runs: at evenly spaced t > t' > ... > 0 the
network predicts x0 and x_{t'} is drawn from q(x_{t'} | x_t, x0) with fresh simplex
noise (GaussianDiffusion.posterior_step); the last x0 prediction is returned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import Config
from ..device import autocast_context, resolve_amp
from . import register_model
from .base import batched
from .maediff import MAEDiff, from_model_range, to_model_range


@register_model("anoddpm")
class AnoDDPM(MAEDiff):
    description = "whole-slice simplex diffusion (AnoDDPM, as reimplemented by pDDPM)"

    def __init__(self, cfg: Config):
        g = cfg.geometry
        if g.patch_size != g.image_size or cfg.mae.enabled:
            raise ValueError(
                f"anoddpm noises the whole slice: geometry.patch_size={g.patch_size} must equal "
                f"image_size={g.image_size} and mae.enabled must be false (use the anoddpm presets)"
            )
        super().__init__(cfg)

    def timesteps(self) -> list[int]:
        """t_test, then sample_steps - 1 evenly spaced lower timesteps, then 0 (= done)."""
        t0, n = self.cfg.diffusion.t_test, self.cfg.diffusion.sample_steps
        ts = torch.linspace(t0, 0, n + 1).round().long().tolist()
        return sorted(set(ts), reverse=True)

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
        """Alg. 2 with one patch (sample_steps 1) or the iterative reverse process;
        with `brain_mask`, slices without brain keep the input in both (as the patch
        models' empty patches do)."""
        if self.cfg.diffusion.sample_steps == 1:
            return super().reconstruct(
                slices, generator, noise, batch_size, amp, progress, brain_mask
            )
        self.check_images(slices)
        if brain_mask is not None:
            if brain_mask.shape != slices.shape:
                raise ValueError(
                    f"brain_mask must have the shape of the slices {tuple(slices.shape)}, got {tuple(brain_mask.shape)}"
                )
            keep = brain_mask.flatten(1).amax(1) > 0
            if not bool(keep.all()):
                out = slices.to(self.device, torch.float32).clone()
                if bool(keep.any()):
                    sub_noise = None if noise is None else noise[keep]
                    out[keep.to(out.device)] = self.reconstruct(
                        slices[keep], generator, sub_noise, batch_size, amp, progress
                    )
                return out
        S, dev = slices.shape[0], self.device
        amp = resolve_amp(amp or self.cfg.inference.amp, dev)
        x = to_model_range(slices.to(dev, torch.float32))
        noise = self.noise(S, generator, device=dev) if noise is None else noise.to(dev)
        ts = self.timesteps()
        x_t = self.diffusion.q_sample(x, torch.full((S,), ts[0], dtype=torch.long), noise)
        k = torch.zeros(S, dtype=torch.long, device=dev)
        x0 = x_t
        for t, t_prev in zip(ts[:-1], ts[1:]):
            tt = torch.full((S,), t, dtype=torch.long, device=dev)
            parts = []
            for b in batched(S, batch_size or self.cfg.inference.batch_size):
                with autocast_context(dev, amp):
                    parts.append(self.denoise(x_t[b], tt[b], k[b], x[b]).float())
            x0 = torch.cat(parts).clamp(-1, 1)
            if t_prev > 0:
                z = self.noise(S, generator, device=dev)
                x_t = self.diffusion.posterior_step(x_t, tt, torch.full_like(tt, t_prev), x0, z)
            if progress is not None:
                progress(S)
        return from_model_range(x0)


__all__ = ["AnoDDPM"]
