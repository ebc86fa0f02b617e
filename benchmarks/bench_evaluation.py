"""Time the evaluation protocol: post-processing + all metrics for N volumes of
96x96x50 (default 100), with 1 and 2 worker processes. Prints a table.

    python benchmarks/bench_evaluation.py [--volumes 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from maediff.evaluation.protocol import VolumeResult, evaluate_split


def synthetic_volume(i: int, shape=(96, 96, 50)) -> VolumeResult:
    rng = np.random.default_rng(i)
    X, Y, Z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = (X / 0.8) ** 2 + (Y / 0.9) ** 2 + (Z / 1.1) ** 2 < 1
    img = (0.5 + 0.2 * rng.standard_normal(shape)).clip(0, 1).astype(np.float32) * brain
    c = rng.uniform(-0.4, 0.4, 3)
    seg = ((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2 < rng.uniform(0.02, 0.06)) & brain
    rec = np.clip(img + 0.05 * rng.standard_normal(shape), 0, 1).astype(np.float32) * brain
    rec[seg] *= 0.3
    return VolumeResult(f"vol{i:03d}", img, rec, brain, seg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--volumes", type=int, default=100)
    ap.add_argument("--val", type=int, default=10)
    args = ap.parse_args()
    print("| workers | val volumes | test volumes | seconds | s / test volume |")
    print("|---|---|---|---|---|")
    for n_jobs in (1, 2):
        val = (synthetic_volume(10_000 + i) for i in range(args.val))
        test = (synthetic_volume(i) for i in range(args.volumes))
        t = time.perf_counter()
        out = evaluate_split(val, test, n_jobs=n_jobs)
        dt = time.perf_counter() - t
        assert len(out.records) == args.volumes
        print(f"| {n_jobs} | {args.val} | {args.volumes} | {dt:.1f} | {dt / args.volumes:.3f} |")


if __name__ == "__main__":
    main()
