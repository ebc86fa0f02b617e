"""Quality per CPU-minute at the `cpu` scale: train variants of the preset for a fixed
number of steps, then run the protocol on the first volumes of each split. Prints a
table; every run lives in its own folder under OUT (result.json), so an interrupted
sweep resumes where it stopped, and `--run-index I J` splits it over processes.

    maediff synth -o data/synthetic
    python benchmarks/sweep_cpu_scale.py --data data/synthetic --out sweep --threads 1 --run-index 0 &
    python benchmarks/sweep_cpu_scale.py --data data/synthetic --out sweep --threads 1 --run-index 1 &
    wait; python benchmarks/sweep_cpu_scale.py --data data/synthetic --out sweep --collect

A variant is a list of overrides of the `cpu` preset and a step budget. The step
budgets give variants of different cost about the same CPU time; the idle cost of a
step (2 threads) is measured by `benchmarks/bench_models.py` and written beside the
table. Decisions are taken on the validation columns (validation loss of training,
pooled validation Dice that the threshold search reaches).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from study_tools import add_job_arguments, pick, set_threads, slug

from maediff.config import apply_overrides, get_preset
from maediff.pipeline.evaluate import evaluate_model
from maediff.training.data import prepare_training_data
from maediff.training.trainer import train
from maediff.weights import load_model

# the previous preset: 32 channels (1, 2, 2), ADM up-sampling widths, constant lr 3e-4
OLD = [
    "unet.model_channels=32",
    "unet.channel_mult=[1,2,2]",
    "unet.num_head_channels=32",
    "unet.norm_groups=16",
    "unet.up_width=same",
    "train.lr=3e-4",
    "train.schedule=constant",
    "train.warmup_steps=0",
    "train.ema_decay=0",
]
CONSTANT = ["train.lr=3e-4", "train.schedule=constant", "train.warmup_steps=0", "train.ema_decay=0"]
W16_124 = [
    "unet.model_channels=16",
    "unet.channel_mult=[1,2,4]",
    "unet.num_head_channels=32",
    "unet.norm_groups=8",
    "unet.up_width=next",
]
W16_122 = [
    "unet.model_channels=16",
    "unet.channel_mult=[1,2,2]",
    "unet.num_head_channels=16",
    "unet.norm_groups=8",
    "unet.up_width=next",
]
COSINE = [
    "train.lr=1e-3",
    "train.schedule=cosine",
    "train.warmup_steps=30",
    "train.ema_decay=0.995",
]

# name -> (overrides of the cpu preset, training steps)
VARIANTS: dict[str, tuple[list[str], int]] = {
    "old preset, constant 3e-4": (OLD, 170),
    "16x(1,2,4), constant 3e-4": (W16_124 + CONSTANT, 360),
    "16x(1,2,4), cosine 1e-3 + EMA": (W16_124 + COSINE, 360),
    "16x(1,2,4), batch 16, cosine 1e-3 + EMA": (W16_124 + COSINE + ["train.batch_size=16"], 700),
    "16x(1,2,2), cosine 1e-3 + EMA": (W16_122 + COSINE, 400),
    "16x(1,2,4), cosine 1e-3 + EMA, t 250..750": (
        W16_124 + COSINE + ["diffusion.t_train_min=250", "diffusion.t_train_max=750"],
        360,
    ),
    "16x(1,2,4), cosine 1e-3 + EMA, condition channels": (
        W16_124 + COSINE + ["unet.condition_channels=true"],
        360,
    ),
    "16x(1,2,4), cosine 1e-3 + EMA, t 400..600": (
        W16_124 + COSINE + ["diffusion.t_train_min=400", "diffusion.t_train_max=600"],
        360,
    ),
}


def run_variant(name: str, data_dir: Path, out: Path, volumes: int, seed: int) -> dict:
    folder = out / slug(name)
    result = folder / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    overrides, steps = VARIANTS[name]
    cfg = apply_overrides(
        get_preset("cpu"),
        overrides
        + [
            f"train.max_steps={steps}",
            "train.max_minutes=0",
            "train.epochs=null",
            f"train.seed={seed}",
        ],
    )
    data = prepare_training_data(cfg, data_dir, progress=False)
    t0 = time.perf_counter()
    s = train(cfg, data, folder / "run", device="cpu", progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = evaluate_model(
        load_model(folder / "run"),
        data_dir,
        folder / "eval",
        name,
        seed=seed,
        max_volumes=volumes,
        healthy_test=True,
        n_jobs=1,
        progress=False,
        figures=False,
    )
    eval_s = time.perf_counter() - t0
    row = {"variant": name, "steps": s["steps"], "parameters": s["parameters"]}
    row["best_val_loss"] = s["best_val_loss"]
    for ds, d in summary.datasets.items():
        if ds == "IXI":
            row["IXI_l1"] = d.mean("l1")
            continue
        row[f"{ds}_val_dice"] = float(re.search(r"pooled Dice ([0-9.]+)", d.threshold_source)[1])
        row[f"{ds}_dice"] = d.mean("dice")
        row[f"{ds}_auprc"] = d.mean("auprc")
    row.update(train_s=round(train_s, 1), eval_s=round(eval_s, 1), threads=torch.get_num_threads())
    result.write_text(json.dumps(row, indent=2))
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | parameters | steps | val loss | val pooled Dice tumour / MS | tumour Dice / AUPRC (test, %) | MS Dice / AUPRC (test, %) | healthy l1 (1e-3) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['parameters'] / 1e6:.2f} M | {r['steps']} | {r['best_val_loss']:.4f} "
            f"| {r['Brats21_val_dice']:.3f} / {r['MSLUB_val_dice']:.3f} "
            f"| {100 * r['Brats21_dice']:.1f} / {100 * r['Brats21_auprc']:.1f} "
            f"| {100 * r['MSLUB_dice']:.1f} / {100 * r['MSLUB_auprc']:.1f} | {1e3 * r['IXI_l1']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--volumes", type=int, default=6, help="first N volumes of every split")
    ap.add_argument("--seed", type=int, default=0)
    add_job_arguments(ap, what="variant")
    args = ap.parse_args()
    set_threads(args.threads)
    names = pick(args.variants, args.run_index)
    if args.list:
        print("\n".join(names))
        return
    rows = []
    for name in names:
        result = args.out / slug(name) / "result.json"
        if args.collect:
            if result.exists():
                rows.append(json.loads(result.read_text()))
            continue
        rows.append(run_variant(name, args.data, args.out, args.volumes, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
