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

from dataclasses import replace

import torch
from torch import Tensor

from ..config import Config
from ..diffusion.process import DiffusionConfig
from ..registry import Preset
from .base import Reconstruction, batched
from .maediff import MAEDiff, check_unet, describe_diffusion, from_model_range, to_model_range
from .register import register_model
from .unet import UNetConfig


def _whole_slice(cfg: Config) -> Config:
    """AnoDDPM as pDDPM reimplements it: the same U-Net (no attention) and training,
    the whole slice noised (one patch covering the image), reconstructed from t_test."""
    g = cfg.geometry
    return replace(
        cfg,
        geometry=replace(g, patch_size=g.image_size),
        unet=replace(cfg.section(UNetConfig), attention_levels=()),
    )


@register_model(
    "anoddpm",
    sections=("unet", "diffusion", "noise"),
    presets=(Preset("anoddpm", "AnoDDPM", _whole_slice, table=("1", 70)),),
    check=check_unet,
    describe=describe_diffusion,
    options=("iterative_sampling",),
)
class AnoDDPM(MAEDiff):
    description = "whole-slice simplex diffusion (AnoDDPM, as reimplemented by pDDPM)"

    def __init__(self, cfg: Config):
        g = cfg.geometry
        if g.patch_size != g.image_size:
            raise ValueError(
                f"anoddpm noises the whole slice: geometry.patch_size={g.patch_size} must equal "
                f"image_size={g.image_size} (use the anoddpm presets)"
            )
        super().__init__(cfg)

    def timesteps(self) -> list[int]:
        """t_test, then sample_steps - 1 evenly spaced lower timesteps, then 0 (= done)."""
        t0, n = (
            self.cfg.section(DiffusionConfig).t_test,
            self.cfg.section(DiffusionConfig).sample_steps,
        )
        ts = torch.linspace(t0, 0, n + 1).round().long().tolist()
        return sorted(set(ts), reverse=True)

    def reconstruct_slices(self, slices: Tensor, run: Reconstruction) -> Tensor:
        """Alg. 2 with one patch (sample_steps 1) or the iterative reverse process;
        slices without brain are not computed (the driver keeps their input). In the
        iterative process each computed slice's noise comes from `run.noise` or is
        drawn, and progress counts slices per reverse step."""
        if self.cfg.section(DiffusionConfig).sample_steps == 1:
            return super().reconstruct_slices(slices, run)
        keep = run.has_brain
        out = slices.clone()
        if not bool(keep.any()):
            return out
        x = to_model_range(slices[keep])
        S, dev = x.shape[0], run.device
        noise = run.noise
        # a given noise (S, 1, H, W) may be on the CPU while the mask is on the GPU:
        # moved first, then indexed on the device
        noise = (
            self.noise(S, run.generator, device=dev)
            if noise is None
            else noise.to(dev, torch.float32)[keep]
        )
        ts = self.timesteps()
        x_t = self.diffusion.q_sample(x, torch.full((S,), ts[0], dtype=torch.long), noise)
        k = torch.zeros(S, dtype=torch.long, device=dev)
        x0 = x_t
        for t, t_prev in zip(ts[:-1], ts[1:]):
            tt = torch.full((S,), t, dtype=torch.long, device=dev)
            parts = []
            for b in batched(S, run.batch_size):
                with run.autocast():
                    parts.append(self.denoise(x_t[b], tt[b], k[b], x[b]).float())
            x0 = torch.cat(parts).clamp(-1, 1)
            if t_prev > 0:
                z = self.noise(S, run.generator, device=dev)
                x_t = self.diffusion.posterior_step(x_t, tt, torch.full_like(tt, t_prev), x0, z)
            if run.progress is not None:
                run.progress(S)
        out[keep] = from_model_range(x0)
        return out


__all__ = ["AnoDDPM"]
