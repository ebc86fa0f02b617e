"""Noise generation cost against a training step, per preset. Prints a table.

    python benchmarks/bench_noise.py [--presets cpu paper] [--repeats 5]

Columns: fresh simplex fields for one batch (direct, vectorised), the same from a
bank, Gaussian noise, and one full training step (forward + backward + Adam, fp32
and bf16 autocast) of the preset, all at the preset's batch size and image size.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from study_tools import median_seconds

from maediff.config import get_preset
from maediff.diffusion.noise import NoiseSampler
from maediff.models.maediff import MAEDiff


def timed(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, warmup=1)


def measure(name: str, repeats: int) -> str:
    cfg = get_preset(name)
    B, H = cfg.train.batch_size, cfg.geometry.image_size
    g = torch.Generator().manual_seed(0)
    direct = NoiseSampler(cfg.noise, (H, H))
    bank = NoiseSampler(replace(cfg.noise, bank_size=64), (H, H))
    gauss = NoiseSampler(replace(cfg.noise, kind="gaussian"), (H, H))
    t_simplex = timed(lambda: direct(B, g), repeats)
    t_bank = timed(lambda: bank(B, g), repeats)
    t_gauss = timed(lambda: gauss(B, g), repeats)
    model = MAEDiff(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(B, 1, H, H)

    def step(amp: bool) -> None:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(x, g)
        loss.backward()
        opt.step()

    reps = max(1, repeats // (3 if name == "cpu" else 5))
    t32 = timed(lambda: step(False), reps)
    t16 = timed(lambda: step(True), reps)
    return f"| {name} | {B} x {H}x{H} | {1e3 * t_simplex:.1f} | {1e3 * t_bank:.1f} | {1e3 * t_gauss:.2f} | {1e3 * t32:.0f} | {1e3 * t16:.0f} | {100 * t_simplex / t16:.1f} % |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["cpu"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(
        "| preset | batch x size | simplex (ms) | bank (ms) | gaussian (ms) | train step fp32 (ms) | train step bf16 (ms) | simplex / bf16 step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        print(measure(name, args.repeats))


if __name__ == "__main__":
    main()
