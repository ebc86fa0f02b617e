"""Measures for comparing diffusion models that need far fewer volumes than Dice.

**Patch probe** (`patch_probe`): the in-patch l1 of the x0 prediction on healthy
validation slices at fixed draws of (t, noise field, patch position). The draws come
from one generator seeded with `PROBE_SEED`, independent of the run's seed, so every
model of the same geometry and noise sees the very same noised inputs and a difference
between two models is a paired one. Per slice and per band of t (B equal bands of
1..T), `draws` triples are drawn: t uniform in the band, one noise field of the model's
own noise sampler, and a patch position uniform among those that hold brain. The l1 is
taken over the brain pixels inside the noised patch, in image intensity units ([0, 1]),
which is what the anomaly map measures on healthy tissue.

**MAE input dependence** (`mae_input_dependence`): how much of the MAE branch's output
depends on the image. At t_test, each patch position k, and one noise field per slice,
the branch output o_i(k) for slices i = 1..n is split into its mean over the slices
(what the branch adds whatever the input: a positional bias) and the rest:

    input share = sum_{i,k} ||o_i(k) - mean_i o_i(k)||^2 / sum_{i,k} ||o_i(k)||^2

and the branch's size relative to the feature map it is added to,
rms(o) / rms(f). A share near 0 means the branch adds a fixed map per position.

    slices, brain = probe_slices(cfg, data_dir)
    result = patch_probe(model, slices, brain)        # {"l1": ..., "bands": [...], ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.datasets import load_subject, volume_to_slices
from ..data.splits import read_pddpm_split
from ..names import HEALTHY

PROBE_SEED = 20240101  # the shared draws: the same for every model and run
PROBE_BANDS = 4
PROBE_VOLUMES = 4  # healthy validation volumes
PROBE_SLICES = 8  # slices per volume, evenly spaced among those with brain
PROBE_DRAWS = 2  # draws per slice and band


def probe_slices(
    cfg: Config,
    data_dir: str | Path,
    volumes: int = PROBE_VOLUMES,
    per_volume: int = PROBE_SLICES,
    min_brain_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Healthy validation slices (IXI val of the configured fold) at the model's size:
    (n, 1, H, W) images in [0, 1] and brain masks (bool). From each of the first
    `volumes` volumes, `per_volume` axial slices evenly spaced among those whose brain
    covers at least `min_brain_fraction` of the slice."""
    subjects = read_pddpm_split(data_dir, HEALTHY, "val", fold=cfg.data.fold)[:volumes]
    if not subjects:
        raise ValueError(f"{data_dir} has no healthy validation volumes (IXI val) to probe")
    size = cfg.geometry.image_size
    images, masks = [], []
    for s in subjects:
        vol = load_subject(s, cfg.data)
        img = volume_to_slices(vol.image, size)
        brain = volume_to_slices(vol.brain_mask.astype(np.float32), size) > 0
        ok = torch.nonzero(brain.flatten(1).float().mean(1) >= min_brain_fraction).flatten()
        if len(ok) == 0:
            raise ValueError(f"{s.image}: no slice holds {min_brain_fraction:.0%} brain")
        pick = ok[np.unique(np.linspace(0, len(ok) - 1, per_volume).round().astype(int))]
        images.append(img[pick])
        masks.append(brain[pick])
    return torch.cat(images), torch.cat(masks)


def check_probed(model) -> None:
    """The probe measures models that declare it (AnomalyModel.patch_probe)."""
    if not model.patch_probe:
        raise ValueError(
            f"model {model.registry_name!r} declares no patch probe (AnomalyModel.patch_probe)"
        )


def probe_draws(
    model, brain: torch.Tensor, bands: int = PROBE_BANDS, draws: int = PROBE_DRAWS
) -> dict[str, torch.Tensor]:
    """The shared draws for `brain` (n, 1, H, W): t, band, noise, k and the slice index of
    each of the n * bands * draws rows (band-major). Depends only on the model's
    geometry, diffusion length and noise configuration, never on its weights."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    n = brain.shape[0]
    T = model.timesteps
    edges = np.linspace(0, T, bands + 1).round().astype(int)  # band b: edges[b]+1..edges[b+1]
    has_brain = model.grid.extract(brain.float()).flatten(2).amax(-1) > 0  # (n, K)
    if not bool(has_brain.any(1).all()):
        raise ValueError("every probe slice needs brain pixels")
    rows: dict[str, list[torch.Tensor]] = {"t": [], "band": [], "k": [], "slice": [], "noise": []}
    for b in range(bands):
        lo, hi = int(edges[b]) + 1, int(edges[b + 1])
        for _ in range(draws):
            rows["t"].append(torch.randint(lo, hi + 1, (n,), generator=g))
            rows["band"].append(torch.full((n,), b))
            rows["k"].append(torch.multinomial(has_brain.float(), 1, generator=g).flatten())
            rows["slice"].append(torch.arange(n))
            rows["noise"].append(model.noise(n, g))
    out = {key: torch.cat(v) for key, v in rows.items()}
    out["edges"] = torch.from_numpy(edges)
    return out


@torch.no_grad()
def patch_probe(
    model,
    slices: torch.Tensor,
    brain: torch.Tensor,
    bands: int = PROBE_BANDS,
    draws: int = PROBE_DRAWS,
    batch_size: int = 64,
) -> dict:
    """In-patch l1 at the shared draws (module docstring). Returns overall and per-band
    means and the per-draw values (`per_draw`, for paired comparisons), in image units.
    The model declares `patch_probe` and computes each draw's l1 (`probe_l1`)."""
    check_probed(model)
    was_training = model.training
    model.eval()
    d = probe_draws(model, brain, bands, draws)
    dev = model.device
    x_all = model.probe_inputs(slices.to(dev, torch.float32))
    l1 = torch.empty(len(d["t"]))
    try:
        for idx in torch.arange(len(d["t"])).split(batch_size):
            s, k, t = d["slice"][idx], d["k"][idx].to(dev), d["t"][idx]
            noise = d["noise"][idx].to(dev, torch.float32)
            l1[idx] = model.probe_l1(x_all[s.to(dev)], t, noise, k, brain[s].to(dev, torch.float32))
    finally:
        model.train(was_training)
    band = d["band"]
    edges = d["edges"].tolist()
    return {
        "l1": float(l1.mean()),
        "bands": [
            {"t": [edges[b] + 1, edges[b + 1]], "l1": float(l1[band == b].mean())}
            for b in range(bands)
        ],
        "n_draws": len(l1),
        "n_slices": int(slices.shape[0]),
        "seed": PROBE_SEED,
        "per_draw": [round(float(v), 7) for v in l1],
    }


@torch.no_grad()
def mae_input_dependence(
    model, slices: torch.Tensor, batch_size: int = 64, seed: int = PROBE_SEED
) -> dict | None:
    """Input share and relative size of the MAE branch's output (module docstring);
    None for a model without the branch (`has_probe_branch`)."""
    check_probed(model)
    if not model.has_probe_branch:
        return None
    was_training = model.training
    model.eval()
    dev = model.device
    g = torch.Generator().manual_seed(seed)
    n, K = slices.shape[0], model.grid.num_patches
    x = model.probe_inputs(slices.to(dev, torch.float32))
    t = torch.full((n,), model.t_test, dtype=torch.long)
    noise = model.noise(n, g).to(dev, torch.float32)
    num = den = f_sq = 0.0
    try:
        for k in range(K):
            kk = torch.full((n,), k, dtype=torch.long, device=dev)
            outs, feats = [], []
            for idx in torch.arange(n).split(batch_size):
                f, o = model.probe_branch(x[idx], t[idx], noise[idx], kk[idx])
                feats.append(f.float())
                outs.append(o.float())
            o, f = torch.cat(outs), torch.cat(feats)
            num += float(((o - o.mean(0, keepdim=True)) ** 2).sum())
            den += float((o**2).sum())
            f_sq += float((f**2).sum())
    finally:
        model.train(was_training)
    return {
        "input_share": num / max(den, 1e-30),
        "relative_rms": (den / max(f_sq, 1e-30)) ** 0.5,
        "n_slices": n,
        "positions": K,
    }


__all__ = ["check_probed", "mae_input_dependence", "patch_probe", "probe_draws", "probe_slices"]
