"""Cost of every model of the registry: parameters, training steps per second and
seconds per volume for detection, at each scale (untrained weights; speed does not
depend on them). One row per (model, scale); medians of `--repeats` timings.

    python benchmarks/bench_models.py                       # cpu and tiny scales
    python benchmarks/bench_models.py --scales paper --steps 1 --slices 4

Training: `--steps` optimizer steps on one batch of the preset's size (volumes for
SVAE), through the same per-group step the trainer takes. Detection: `model.reconstruct`
on `--slices` slices of the model's size, scaled to a 50-slice volume. Both on the CPU
with the preset's autocast resolved for this machine (fp32 where bf16 is not native).
"""

from __future__ import annotations

import argparse

import torch
from study_tools import median_seconds, train_step_seconds

from maediff.config import get_preset
from maediff.device import resolve_amp
from maediff.models import MODELS, build_model, count_parameters
from maediff.registry import preset_name, presets_of_table

UNIQUE = [
    m
    for m in (*presets_of_table("1"), *presets_of_table("2"))
    if m not in ("ablation-unet", "ablation-unet-att-mae")
]


def detect_seconds(model, cfg, slices: int, repeats: int) -> float:
    H = cfg.geometry.image_size
    x = torch.rand(slices, 1, H, H)
    seconds = median_seconds(
        lambda: model.reconstruct(x, torch.Generator().manual_seed(0)), repeats
    )
    return seconds * 50 / slices


def count_flops(model, cfg) -> tuple[float, float]:
    """FLOPs of one training sample (forward + backward of every group once, averaged
    over the groups a phase cycles through) and of detecting one 50-slice volume."""
    from torch.utils.flop_counter import FlopCounterMode

    H = cfg.geometry.image_size
    vol = model.input_kind == "volumes"
    x = torch.rand((1, cfg.data.volume_shape[2], 1, H, H) if vol else (1, 1, H, H))
    g = torch.Generator().manual_seed(0)
    groups = [grp for ph in model.phases for grp in ph.groups] if model.trainable else []
    train = 0.0
    for group in groups:
        try:
            with FlopCounterMode(display=False) as fc:
                model(x, g, group=group).backward()
        except RuntimeError:  # the flop counter cannot follow a double backward (WGAN-GP)
            return float("nan"), float("nan")
        train += fc.get_total_flops() / len(groups)
    with FlopCounterMode(display=False) as fc:
        model.reconstruct(torch.rand(2, 1, H, H), g)
    per_slice = fc.get_total_flops() / 2
    return train / (x.shape[1] if vol else 1), per_slice * 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scales", nargs="+", default=["cpu", "tiny"])
    ap.add_argument("--models", nargs="+", default=UNIQUE)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flops", action="store_true", help="count FLOPs instead of timing")
    args = ap.parse_args()
    if args.flops:
        print(
            "| model | scale | GFLOP per training slice (fwd + bwd) | GFLOP per detected volume |"
        )
        print("|---|---|---|---|")
        for scale in args.scales:
            for name in args.models:
                cfg = get_preset(preset_name(name, scale))
                tr, det = count_flops(build_model(cfg), cfg)
                print(f"| {name} | {scale} | {tr / 1e9:.2f} | {det / 1e9:.1f} |", flush=True)
        return
    amp = resolve_amp("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, autocast 'auto' -> {amp}")
    print(
        "| model | scale | parameters | batch | train steps / s | detection s / volume (50 slices) |"
    )
    print("|---|---|---|---|---|---|")
    for scale in args.scales:
        for name in args.models:
            cfg = get_preset(preset_name(name, scale))
            torch.manual_seed(0)
            model = build_model(cfg)
            steps = "-"
            if MODELS[cfg.model].trainable:
                steps = f"{1 / train_step_seconds(model, cfg, args.steps, args.repeats, amp=cfg.train.amp):.3f}"
            model.eval()
            det = detect_seconds(model, cfg, args.slices, args.repeats)
            print(
                f"| {name} | {scale} | {count_parameters(model):,} | {cfg.train.batch_size} | {steps} | {det:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
