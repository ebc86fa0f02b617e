"""Seconds per volume of the whole protocol (`evaluate`: load, reconstruct every patch,
post-process, metrics) at the `cpu` scale: the previous preset against the current
one, in one process and in single-threaded worker processes. Untrained weights (the
cost does not depend on them), the first N volumes of every split of a synthetic
benchmark, medians of several repeats. Also checks that the workers give the metrics
of the in-process run.

    maediff synth -o data/synthetic
    python benchmarks/bench_evaluation_cost.py --data data/synthetic --volumes 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from maediff.config import apply_overrides, get_preset
from maediff.models import build_model
from maediff.pipeline.evaluate import evaluate_model
from maediff.reporting.summary import EvaluationSummary

# the `cpu` preset of the previous release (0.2.0)
PREVIOUS = [
    "unet.model_channels=32",
    "unet.channel_mult=[1,2,2]",
    "unet.num_head_channels=32",
    "unet.norm_groups=16",
    "unet.up_width=same",
]


def _model(overrides: list[str]):
    torch.manual_seed(0)
    model = build_model(apply_overrides(get_preset("cpu"), overrides)).eval()
    with torch.no_grad():  # draw the zero-initialised layers so that outputs vary
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _evaluate(
    model, data: Path, volumes: int, workers: int
) -> tuple[float, EvaluationSummary, int]:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        s = evaluate_model(
            model,
            data,
            Path(tmp) / "eval",
            max_volumes=volumes,
            workers=workers,
            n_jobs=1,
            progress=False,
            figures=False,
        )
        dt = time.perf_counter() - t
    n = sum(d.n_test for d in s.datasets.values()) + sum(
        int(d.threshold_source.split("(")[1].split()[0])
        for d in s.datasets.values()
        if d.threshold_source is not None
    )
    return dt, s, n


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--volumes", type=int, default=1, help="first N volumes of every split")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows, summaries = [], {}
    cases = [
        ("previous cpu preset (0.2.0)", PREVIOUS, 0),
        ("current cpu preset", [], 0),
        ("current cpu preset", [], 2),
    ]
    for name, overrides, workers in cases:
        model = _model(overrides)
        times = []
        for _ in range(args.repeats):
            dt, s, n = _evaluate(model, args.data, args.volumes, workers)
            times.append(dt / n)
        summaries[(name, workers)] = s
        rows.append((name, workers, n, statistics.median(times), times))
        print(f"{name}, workers {workers}: {[round(t, 2) for t in times]} s/volume", flush=True)
    base = rows[0][3]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads in the main process\n")
    print("| configuration | processes | volumes | s / volume (median) | speed-up |")
    print("|---|---|---|---|---|")
    for name, workers, n, med, _ in rows:
        procs = f"{workers} x 1 thread" if workers else f"1 x {torch.get_num_threads()} threads"
        print(f"| {name} | {procs} | {n} | {med:.2f} | {base / med:.2f}x |")
    a, b = summaries[("current cpu preset", 0)], summaries[("current cpu preset", 2)]
    diff = max(
        abs(a.mean(ds, m) - b.mean(ds, m))
        for ds, d in a.datasets.items()
        for m in d.metrics
        if b.mean(ds, m) is not None
    )
    print(f"\nlargest difference of a mean metric, workers vs in process: {diff:.2e}")


if __name__ == "__main__":
    main()
