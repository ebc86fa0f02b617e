"""MAEDiff: patch-wise training (paper Alg. 1) and sequential patch-wise
reconstruction (paper Alg. 2) around a U-Net with an optional MAE branch.

Images enter and leave in [0, 1]; the diffusion runs on [-1, 1] (docs/method.md §Diffusion).

    model = MAEDiff(get_preset("cpu"))
    loss = model.loss(x0, generator=g)                      # x0: (B, 1, H, W)
    rec = model.reconstruct(slices, generator=g)            # slices: (S, 1, H, W)
    anomaly = (slices - rec).abs()                          # paper Alg. 2 line 14
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config
from ..device import to_device
from ..diffusion.noise import NoiseConfig, NoiseSampler
from ..diffusion.patches import PatchGrid
from ..diffusion.process import DiffusionConfig, GaussianDiffusion
from ..registry import Preset, check, models_with
from .base import AnomalyModel, Reconstruction
from .mae import MAEConfig
from .register import register_model
from .unet import UNet, UNetConfig


def to_model_range(x: Tensor) -> Tensor:
    return x * 2 - 1


def from_model_range(x: Tensor) -> Tensor:
    return (x + 1) / 2


def check_unet(cfg: Config) -> None:
    """The U-Net against the image size (both diffusion models)."""
    downs = 2 ** (len(cfg.section(UNetConfig).channel_mult) - 1)
    H = cfg.geometry.image_size
    check(
        H % downs == 0, f"image_size {H} must be divisible by the U-Net downsampling factor {downs}"
    )


def _check_maediff(cfg: Config) -> None:
    check_unet(cfg)
    steps = cfg.section(DiffusionConfig).sample_steps
    check(
        steps == 1,
        f"diffusion.sample_steps={steps}: iterative sampling is an option of model "
        f"{' / '.join(models_with('iterative_sampling'))} (model={cfg.model!r}), "
        "this one reconstructs in one step",
    )
    if cfg.section(MAEConfig).enabled:
        downs = 2 ** (len(cfg.section(UNetConfig).channel_mult) - 1)
        H, p = cfg.geometry.image_size, cfg.geometry.patch_size
        check(
            downs == 4,
            f"the MAE needs the U-Net encoder output at H/4, but channel_mult={cfg.section(UNetConfig).channel_mult} gives H/{downs}",
        )
        check(
            p < H,
            f"with the MAE enabled the patch (p={p}) must leave visible cells in the image ({H})",
        )


def describe_diffusion(cfg: Config) -> str:
    g, u, d = cfg.geometry, cfg.section(UNetConfig), cfg.section(DiffusionConfig)
    mae = cfg.section(MAEConfig) if cfg.holds(MAEConfig) else None
    return (
        f"{cfg.name}: {g.image_size}x{g.image_size}, p={g.patch_size} s={g.stride} r={g.grid_size} "
        f"(K={g.num_patches}, N={g.num_cells}), U-Net {u.model_channels}x{list(u.channel_mult)}"
        f" x{u.num_res_blocks}, att={list(u.attention_levels)}, "
        f"MAE={'on' if mae is not None and mae.enabled else 'off'}, "
        f"{d.schedule} T={d.timesteps} t_test={d.t_test}, noise={cfg.section(NoiseConfig).kind}"
    )


def variant(cfg: Config, *, mae: bool, attention: bool, stride: int | None = None) -> Config:
    """Table 2: U-Net (+ global attention at H/2, H/4) (+ MAE); pDDPM = U-Net, no MAE."""
    cfg = replace(
        cfg,
        mae=replace(cfg.section(MAEConfig), enabled=mae),
        unet=replace(cfg.section(UNetConfig), attention_levels=(2, 4) if attention else ()),
    )
    return replace(cfg, geometry=replace(cfg.geometry, stride=stride or cfg.geometry.stride))


@register_model(
    "maediff",
    sections=("unet", "mae", "diffusion", "noise"),
    presets=(
        Preset(
            "pddpm-s48",
            "pDDPM s48",
            lambda c: variant(c, mae=False, attention=False, stride=48),
            table=("1", 80),
        ),
        Preset(
            "pddpm-s16",
            "pDDPM s16",
            lambda c: variant(c, mae=False, attention=False, stride=16),
            table=("1", 90),
            same_as="ablation-unet",
        ),
        # = Table 2 "U-Net + Att. + MAE" (the published numbers)
        Preset(
            "maediff", "MAEDiff", table=("1", 100), same_as="ablation-unet-att-mae", reference=True
        ),
        Preset(
            "ablation-unet",
            "U-Net",
            lambda c: variant(c, mae=False, attention=False),
            table=("2", 10),
            same_as="pddpm-s16",
        ),
        Preset(
            "ablation-unet-att",
            "U-Net + Att.",
            lambda c: variant(c, mae=False, attention=True),
            table=("2", 20),
        ),
        Preset(
            "ablation-unet-mae",
            "U-Net + MAE",
            lambda c: variant(c, mae=True, attention=False),
            table=("2", 30),
        ),
        Preset(
            "ablation-unet-att-mae",
            "U-Net + Att. + MAE",
            lambda c: variant(c, mae=True, attention=True),
            table=("2", 40),
            same_as="maediff",
            reference=True,
        ),
    ),
    check=_check_maediff,
    describe=describe_diffusion,
    options=("guided_patches", "noise_ensembles"),
)
class MAEDiff(AnomalyModel):
    """Patch diffusion with an optional MAE branch. Without the MAE it is pDDPM; the
    Table 2 ablations are configurations of this class (config presets)."""

    draws_noise = True
    trained_options = ("diffusion.t_test", "diffusion.sample_steps")
    clamped_before_0_5 = False  # the range was never clamped (pDDPM's evaluation)
    patch_probe = True

    description = "patch diffusion (pDDPM) with a masked-autoencoder branch (MAEDiff)"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        g = cfg.geometry
        mae = cfg.section(MAEConfig) if cfg.holds(MAEConfig) else None  # AnoDDPM has none
        self.net = UNet(
            cfg.section(UNetConfig), g, mae if mae is not None and mae.enabled else None
        )
        self.diffusion = GaussianDiffusion(cfg.section(DiffusionConfig))
        self.grid = PatchGrid(g)
        self.noise = NoiseSampler(cfg.section(NoiseConfig), (g.image_size, g.image_size))
        self.register_buffer(
            "patch_masks", self.grid.patch_masks(), persistent=False
        )  # (K, 1, H, W)
        self.register_buffer("masked_cells", self.grid.masked_cells(), persistent=False)  # (K, N)
        self.noise_std = self._noise_std() if cfg.section(DiffusionConfig).precondition else 1.0
        self.last_guided: dict | None = None  # the last guided pass, for inspection
        # every patch covers the same (p/r)^2 cells: the MAE's visible count is known here,
        # so no step reads the mask back from the GPU to count it
        self.num_visible = g.num_cells - (g.patch_size // g.grid_size) ** 2
        if not bool(((~self.masked_cells).sum(1) == self.num_visible).all()):
            raise ValueError(f"patches of {g} do not all leave {self.num_visible} cells visible")

    # ------------------------------------------------------------------ one network call

    def denoise(self, x_tilde: Tensor, t: Tensor, k: Tensor, x0: Tensor) -> Tensor:
        """p_theta(x~_t, x^_0, t) for patch positions k: (B, 1, H, W) -> x0 estimate.

        x0 (model range) supplies the visible region x^_0 = x0 * (1 - M_p) when the
        U-Net takes condition channels; the MAE sees only the cells outside patch k.
        """
        args, skip, c_out = self.network_inputs(x_tilde, t, k, x0)
        out = self.net(*args)
        return out if skip is None else skip + c_out * out.float()

    def network_inputs(
        self, x_tilde: Tensor, t: Tensor, k: Tensor, x0: Tensor
    ) -> tuple[tuple, Tensor | None, Tensor | None]:
        """What `denoise` hands the U-Net: its arguments (input, t, visible cells,
        condition, visible count, clean image), and with diffusion.precondition the skip
        and output scale that make its output an x0 estimate (else None, None)."""
        visible = ~self.masked_cells[k] if self.net.mae is not None else None
        cond = None
        if self.cfg.section(UNetConfig).condition_channels:
            m = self.patch_masks[k].to(x0.dtype)
            cond = torch.cat([x0 * (1 - m), m], dim=1)
        t = t.to(x_tilde.device)
        clean = (
            x0 if visible is not None and self.cfg.section(MAEConfig).tokens == "clean" else None
        )
        if not self.cfg.section(DiffusionConfig).precondition:
            return (x_tilde, t, visible, cond, self.num_visible, clean), None, None
        net_in, skip, c_out = self.precondition(x_tilde, t, k)
        return (net_in, t, visible, cond, self.num_visible, clean), skip, c_out

    def _noise_std(self) -> float:
        """Std of the forward process's noise fields (fixed draws): 1 for Gaussian or
        normalised noise, about 0.5 for the reference's unnormalised simplex octaves."""
        fields = self.noise(16, torch.Generator().manual_seed(0))
        return float(fields.std())

    def precondition(self, x_tilde: Tensor, t: Tensor, k: Tensor):
        """(network input, skip, output scale) of diffusion.precondition: inside patch k
        the input has unit variance whatever t, and the prediction starts from the
        linear least-squares estimate of x0 given x~_t (zero-mean images of std
        sigma_data); outside the patch the clean input passes as it is."""
        m = self.patch_masks[k] > 0
        a, b = self.diffusion.coefficients(t, x_tilde)
        sd, sn = self.cfg.section(DiffusionConfig).sigma_data, self.noise_std
        c_in = (a * a * sd * sd + b * b * sn * sn).rsqrt()
        net_in = torch.where(m, x_tilde * c_in, x_tilde)
        skip = torch.where(m, x_tilde * a * sd * sd * c_in * c_in, x_tilde)
        c_out = torch.where(m, b * sn * sd * c_in, torch.ones_like(c_in))
        return net_in, skip, c_out

    def noised_input(self, x0: Tensor, x_t: Tensor, k: Tensor) -> Tensor:
        """Paper Eq. 8: x~_t = x_t inside patch k, x0 outside (bit-exact)."""
        return torch.where(self.patch_masks[k] > 0, x_t, x0)

    # ------------------------------------------------------------------ test-time noise level

    @property
    def timesteps(self) -> int:
        return self.cfg.diffusion.timesteps

    @property
    def t_test(self) -> int:
        return self.cfg.diffusion.t_test

    def t_test_range(self) -> tuple[int, int]:
        """From diffusion.sample_steps (iterative sampling needs t_test >= its steps) to T."""
        return self.cfg.diffusion.sample_steps, self.cfg.diffusion.timesteps

    def set_t_test(self, t: int) -> None:
        self.cfg = replace(self.cfg, diffusion=replace(self.cfg.diffusion, t_test=int(t)))

    # ------------------------------------------------------------------ probe hooks (benchmark/probe.py)

    def probe_inputs(self, slices: Tensor) -> Tensor:
        return to_model_range(slices)

    def probe_l1(self, x: Tensor, t: Tensor, noise: Tensor, k: Tensor, brain: Tensor) -> Tensor:
        x_t = self.diffusion.q_sample(x, t, noise)
        pred = self.denoise(self.noised_input(x, x_t, k), t, k, x).float()
        m = self.patch_masks[k] * brain
        # model range [-1, 1] -> image units [0, 1]: half the difference
        return ((x - pred).abs() * m).flatten(1).sum(1).cpu() / m.flatten(1).sum(1).cpu() / 2

    @property
    def has_probe_branch(self) -> bool:
        return self.net.mae is not None

    def probe_branch(
        self, x: Tensor, t: Tensor, noise: Tensor, k: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """The MAE branch's output o and the U-Net feature map f it is added to, read
        from the U-Net's encoder half (a method of its own: a forward hook on the MAE
        does not run inside a compiled forward)."""
        if self.net.mae is None:
            return None
        x_t = self.diffusion.q_sample(x, t, noise)
        args, _, _ = self.network_inputs(self.noised_input(x, x_t, k), t, k, x)
        f, o, _, _ = self.net.encode(*args)
        return f, o

    # ------------------------------------------------------------------ Alg. 1

    def loss(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        group: str = "model",
        t: Tensor | None = None,
        noise: Tensor | None = None,
        k: Tensor | None = None,
    ) -> Tensor:
        """One patch-wise training objective (paper Alg. 1, Eq. 9).

        x0: (B, 1, H, W) in [0, 1]. Per sample: t ~ U{t_min..t_max}, a noise field,
        one random patch position k (each drawn from `generator` unless given); l1
        between x0 and the prediction, averaged over the pixels inside the noised patch.
        """
        self.check_images(x0)
        B = x0.shape[0]
        x = to_model_range(x0)
        if t is None:
            t = self.diffusion.sample_timesteps(B, generator)
        if noise is None:
            noise = self.noise(B, generator, device=x.device, dtype=x.dtype)
        if k is None:
            k = torch.randint(self.grid.num_patches, (B,), generator=generator)
        # q_sample checks t where it was drawn (the CPU): nothing is read back from the GPU
        x_t = self.diffusion.q_sample(x, t, noise.to(x.device, x.dtype))
        t, k = to_device(t, x.device), to_device(k, x.device)  # without blocking the host
        pred = self.denoise(self.noised_input(x, x_t, k), t, k, x)
        return self.patch_l1(x, pred.float(), self.patch_masks[k], x0)

    def patch_l1(self, x: Tensor, pred: Tensor, m: Tensor, x0: Tensor) -> Tensor:
        """Eq. 9: the mean of |x - pred| over the noised patch's pixels (m: (B, 1, H, W)).
        With diffusion.background_weight w < 1 a background pixel (x0 = 0) counts w
        times a brain pixel (a weighted mean; w = 1 is the paper's plain mean)."""
        w = self.cfg.section(DiffusionConfig).background_weight
        if w < 1.0:
            m = m * torch.where(x0 > 0, 1.0, w).to(m.dtype)
        return ((x - pred).abs() * m).sum() / m.sum().clamp_min(1e-8)

    # ------------------------------------------------------------------ Alg. 2

    def coarse_patches(self) -> Tensor:
        """Patch positions at stride s = p, which tile the slice: (K,) bool."""
        p = self.cfg.geometry.patch_size
        return (self.grid.positions % p == 0).all(1)

    def guided_pass(
        self, x: Tensor, patches: Tensor, pairs: Tensor, run, brain: Tensor | None
    ) -> Tensor:
        """Lesion-guided patch selection (inference.patch_selection="guided").

        1. Every (row, patch) pair of the coarse positions (stride p, a tiling) is
           denoised: a first reconstruction, each pixel from one patch.
        2. Its anomaly |x - rec| (inside the brain, when a mask is given) is averaged
           over each r x r grid cell; cells above the `guided_quantile` of the brain
           cells' values (over all rows of this call: the volume) are flagged.
        3. Every patch that covers a flagged cell is denoised as well. A pixel covered
           by selected patches gets their average (a pixel of a flagged cell: exactly
           Alg. 2's average over every patch at the full stride), any other pixel the
           coarse reconstruction. Returns the result in model range, (R, 1, H, W)."""
        K, r = self.grid.num_patches, self.cfg.geometry.grid_size
        coarse = self.coarse_patches().to(x.device)
        wanted = torch.zeros(x.shape[0] * K, dtype=torch.bool, device=x.device)
        wanted[pairs] = True  # pairs skipped for holding no brain stay skipped
        run(torch.nonzero(wanted & coarse.repeat(x.shape[0])).flatten())
        rough, _ = self.grid.stitch_selected(patches, coarse[None].expand(x.shape[0], K))
        anomaly = (x - rough).abs() if brain is None else (x - rough).abs() * brain
        cells = F.avg_pool2d(anomaly, r)  # (R, 1, H/r, W/r)
        inside = (
            F.avg_pool2d(brain, r) > 0
            if brain is not None
            else torch.ones_like(cells, dtype=torch.bool)
        )
        if bool(inside.any()):
            tau = torch.quantile(cells[inside].float(), self.cfg.inference.guided_quantile)
            flagged = (cells > tau) & inside
        else:
            flagged = torch.zeros_like(inside)
        masked = self.masked_cells.view(K, *flagged.shape[-2:]).to(x.device)  # (K, h, w)
        chosen = (flagged[:, 0, None] & masked[None]).flatten(2).any(-1)  # (R, K)
        chosen = chosen.flatten() & wanted
        run(torch.nonzero(chosen & ~coarse.repeat(x.shape[0])).flatten())
        fine, count = self.grid.stitch_selected(patches, chosen.view(-1, K))
        # for inspection (tests, the guided benchmark): the flagged cells (R, 1, h, w),
        # the chosen pairs (R, K) and the share of the pairs Alg. 2 would denoise
        self.last_guided = {
            "flagged": flagged,
            "chosen": chosen.view(-1, K),
            "fraction": float(chosen.float().sum() / wanted.float().sum().clamp_min(1)),
        }
        return torch.where(count > 0, fine, rough)

    def compile_targets(self) -> list[torch.nn.Module]:
        return [self.net]

    def ensemble_timesteps(self) -> list[int]:
        """t of every ensemble member, member-major: each t of inference.ensemble_t
        (or diffusion.t_test) `ensemble_draws` times."""
        inf = self.cfg.inference
        ts = inf.ensemble_t or (self.cfg.section(DiffusionConfig).t_test,)
        for t in ts:
            if not 1 <= t <= self.cfg.section(DiffusionConfig).timesteps:
                raise ValueError(
                    f"inference.ensemble_t holds {t}, outside 1..{self.cfg.section(DiffusionConfig).timesteps}"
                )
        return [t for t in ts for _ in range(inf.ensemble_draws)]

    def reconstruct_slices(
        self, slices: Tensor, run: Reconstruction, guide_mask: Tensor | None = None
    ) -> Tensor:
        """Healthy reconstruction of every slice (paper Alg. 2) at t = t_test, through
        the one driver `reconstruct` (models/base.py: batching, autocast, progress, the
        brain mask, the range).

        slices: (S, 1, H, W) in [0, 1] -> (S, 1, H, W). Each slice gets one noise field
        (or the given `noise`, (S, 1, H, W)); every (slice, patch) pair is denoised,
        `batch_size` pairs per forward pass; overlapping predictions are averaged
        (sum and count over all patches, divided once). Progress counts pairs.

        With a brain mask, pairs whose patch holds no brain pixel are skipped and their
        pixels keep the input. Every patch covering a brain pixel holds that pixel, so
        brain pixels get exactly the full Alg. 2 result.

        guide_mask (S, 1, H, W), optional: the brain, for inference.patch_selection
        "guided" only (where it looks for anomalies; `guided_pass`); the brain mask
        serves when it is not given.

        Noise ensembles (inference.ensemble_t / ensemble_draws, E members): every member
        is a slice of its own with its own noise field and t, all (member, slice, patch)
        triples go through the same batched loop (`noise`: (E*S, 1, H, W), member-major).
        The result is x - sign(mean_e d_e) * mean_e |d_e| with d_e = x - rec_e, so that
        |x - result| is the mean of the members' anomaly maps; where the members agree
        in sign it equals their mean reconstruction.
        """
        S = slices.shape[0]
        dev = run.device
        K = self.grid.num_patches
        ts = self.ensemble_timesteps()
        E = len(ts)
        x = to_model_range(slices).repeat(E, 1, 1, 1)  # (E*S, ...)
        noise = run.noise
        if noise is None:
            noise = self.noise(E * S, run.generator, device=dev)
        elif noise.shape != x.shape:
            raise ValueError(
                f"noise must have the shape {tuple(x.shape)} ({E} ensemble member(s) x the slices {tuple(slices.shape)}), got {tuple(noise.shape)}"
            )
        t_rows = torch.tensor(ts, dtype=torch.long).repeat_interleave(S)  # (E*S,)
        x_t = self.diffusion.q_sample(x, t_rows, noise.to(dev, torch.float32))
        patches = self.grid.extract(x)  # (E*S, K, 1, p, p); skipped pairs keep the input
        if run.brain is None:
            pairs = torch.arange(E * S * K, device=dev)
        else:
            has_brain = self.grid.extract(run.brain).flatten(2).amax(-1) > 0  # (S, K)
            pairs = torch.nonzero(has_brain.repeat(E, 1).flatten()).flatten()
        t_rows = t_rows.to(dev)

        def denoise_pairs(chosen: Tensor) -> None:  # these (row, patch) pairs -> `patches`
            for chunk in run.batches(chosen):
                s, k = chunk // K, chunk % K
                with run.autocast():
                    pred = self.denoise(self.noised_input(x[s], x_t[s], k), t_rows[s], k, x[s])
                patches[s, k] = self.grid.crop(pred.float(), k)

        if self.cfg.inference.patch_selection == "guided":
            where = guide_mask if guide_mask is not None else run.brain
            brain = None if where is None else where.to(dev, torch.float32).repeat(E, 1, 1, 1)
            rec = from_model_range(self.guided_pass(x, patches, pairs, denoise_pairs, brain))
        else:
            denoise_pairs(pairs)
            rec = from_model_range(self.grid.stitch(patches))
        if E == 1:
            return rec
        d = slices[None] - rec.view(E, *slices.shape)  # (E, S, 1, H, W)
        sign = torch.where(d.mean(0) >= 0, 1.0, -1.0)
        return slices - sign * d.abs().mean(0)


__all__ = ["MAEDiff", "from_model_range", "to_model_range"]
