"""Alg. 2 speed: one 50-slice volume through MAEDiff.reconstruct per preset, batch
size and autocast mode (untrained weights; speed does not depend on them).

    python benchmarks/bench_reconstruct.py [--preset cpu] [--batch-sizes 16 32 64 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from maediff.config import get_preset
from maediff.models.maediff import MAEDiff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--slices", type=int, default=50)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 256])
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    model = MAEDiff(cfg).eval()
    H = cfg.geometry.image_size
    x = torch.rand(args.slices, 1, H, H)
    pairs = args.slices * cfg.geometry.num_patches
    print(
        f"preset {args.preset}: {args.slices} slices x K={cfg.geometry.num_patches} = {pairs} forward passes of {H}x{H}"
    )
    print("| amp | batch | seconds / volume | ms / pair |")
    print("|---|---|---|---|")
    for amp in ("none", "bf16"):
        for bs in args.batch_sizes:
            model.reconstruct(x[:2], torch.Generator().manual_seed(0), batch_size=bs, amp=amp)
            t = time.perf_counter()
            model.reconstruct(x, torch.Generator().manual_seed(0), batch_size=bs, amp=amp)
            dt = time.perf_counter() - t
            print(f"| {amp} | {bs} | {dt:.2f} | {1e3 * dt / pairs:.2f} |")


if __name__ == "__main__":
    main()
