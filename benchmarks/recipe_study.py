"""Which training recipe learns faster per CPU-minute at the `cpu` scale, decided on
validation only: each variant of the `cpu` preset is trained for a step budget with
several seeds, then measured on the unhealthy validation volumes, patches without brain skipped (the pooled Dice that
the protocol's threshold search reaches, and the voxel-wise AUPRC of the pooled
validation scores) and by the patch probe (benchmark/probe.py: in-patch l1 on healthy
validation slices at shared draws). No test volume is read.

Every run lives in OUT/<steps>/<variant>/seed<N>/ (the training run, then result.json,
written last), so an interrupted study resumes where it stopped: a run whose training
was cut short resumes its training, and `--run-index I J` splits the jobs over
processes. Jobs are ordered budget-major, then seed-major, so that every variant has
its first seed before any has its second.

    maediff synth -o data/synthetic
    python benchmarks/recipe_study.py --data data/synthetic --out study --threads 1 --run-index 0 2 &
    python benchmarks/recipe_study.py --data data/synthetic --out study --threads 1 --run-index 1 2 &
    wait; python benchmarks/recipe_study.py --data data/synthetic --out study --collect

`--collect` prints, per budget, each variant's mean ± std over its finished seeds and
its paired difference to the `cpu` preset of the same seed. Two variants compare at equal
training compute rather than equal steps: half the slices per step for twice the steps,
and twice the learning rate. The minutes column is wall time, comparable only between
runs that shared the machine alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from study_tools import add_job_arguments, cpu_name, mean_sd, pick, set_threads, slug

from maediff.benchmark.probe import patch_probe, probe_slices
from maediff.config import apply_overrides, get_preset
from maediff.data.datasets import load_subject
from maediff.data.splits import read_pddpm_split
from maediff.evaluation.metrics import average_precision
from maediff.evaluation.protocol import EvalSettings, VolumeResult, evaluate_split, score_volume
from maediff.names import ANOMALY_SETS
from maediff.pipeline.detect import reconstruct_volume
from maediff.training.data import prepare_training_data
from maediff.training.trainer import train
from maediff.weights import load_model

REFERENCE = "cpu preset"
# The study's reference is the `cpu` preset of release 0.7.0, written out so that the
# study keeps measuring against it after this release adopted the recipe (scales.py).
CPU_070 = [
    "diffusion.t_train_min=1",
    "diffusion.t_train_max=1000",
    "diffusion.background_weight=1",
    "mae.tokens=features",
]
# name -> overrides of the 0.7.0 `cpu` preset (docs/history/0.8.0.md, "A recipe that learns faster")
CHANGES: dict[str, list[str]] = {
    REFERENCE: [],
    "t 350..650": ["diffusion.t_train_min=350", "diffusion.t_train_max=650"],
    "brain-weighted loss": ["diffusion.background_weight=0.1"],
    "zero-mean noise": ["noise.zero_mean=true"],
    "condition channels": ["unet.condition_channels=true"],
    "clean MAE tokens": ["mae.tokens=clean"],
    # equal compute, not equal steps: half the slices per step, twice the steps
    "batch 16, 2x steps": ["train.batch_size=16"],
    "lr 2e-3": ["train.lr=2e-3"],
    # the three that helped on validation, together: the `cpu` preset from 0.8.0 on
    "the three together": [
        "diffusion.t_train_min=350",
        "diffusion.t_train_max=650",
        "diffusion.background_weight=0.1",
        "mae.tokens=clean",
    ],
    # beyond the study: the preset with tiled patches (stride p: 4 positions per slice at
    # 48 px, as pDDPM s48), trained only where Alg. 2 then evaluates, which costs 1/4
    "tiled patches": [
        "diffusion.t_train_min=350",
        "diffusion.t_train_max=650",
        "diffusion.background_weight=0.1",
        "mae.tokens=clean",
        "geometry.stride=24",
    ],
}
VARIANTS: dict[str, list[str]] = {name: CPU_070 + change for name, change in CHANGES.items()}
# variants whose step count is this multiple of the budget (equal training compute)
STEP_FACTOR = {"batch 16, 2x steps": 2}


def jobs(variants: list[str], budgets: list[int], seeds: list[int]) -> list[tuple[int, int, str]]:
    return [(b, s, v) for b in budgets for s in seeds for v in variants]


def validation_metrics(model, data_dir: Path, seed: int) -> dict:
    """Pooled validation Dice (the threshold search's) and AUPRC of every anomaly set."""
    settings = EvalSettings()
    out = {}
    for ds in ANOMALY_SETS:
        vols = []
        for s in read_pddpm_split(data_dir, ds, "val"):
            vol = load_subject(s, model.cfg.data)
            # patches without brain are skipped (they keep the input): the maps inside
            # the brain are Alg. 2's, for less work than the protocol's full pass
            rec = reconstruct_volume(
                model, vol, torch.Generator().manual_seed(seed), skip_empty_patches=True
            )
            vols.append(
                VolumeResult(
                    s.name, vol.image, rec, vol.brain_mask, vol.segmentation, vol.affine, []
                )
            )
        outcome = evaluate_split(vols, [], settings)
        scores = np.concatenate([score_volume(v, settings)[v.brain_mask > 0] for v in vols])
        labels = np.concatenate([v.segmentation[v.brain_mask > 0] > 0 for v in vols])
        out[ds] = {
            "val_dice": float(outcome.val_dice),
            "val_auprc": float(average_precision(scores, labels)),
            "volumes": len(vols),
        }
    return out


def run_job(data_dir: Path, out: Path, steps: int, seed: int, variant: str) -> dict:
    folder = out / str(steps) / slug(variant) / f"seed{seed}"
    result = folder / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    cfg = apply_overrides(
        get_preset("cpu"),
        VARIANTS[variant]
        + [
            f"train.max_steps={steps * STEP_FACTOR.get(variant, 1)}",
            "train.max_minutes=0",
            "train.epochs=null",
            f"train.seed={seed}",
        ],
    )
    run_dir = folder / "run"
    t0 = time.perf_counter()
    if not (run_dir / "train_summary.json").exists():
        data = prepare_training_data(cfg, data_dir, progress=False)
        resume = (run_dir / "config.yaml").exists()
        train(cfg, data, run_dir, device="cpu", progress=False, resume=resume)
    train_s = time.perf_counter() - t0
    summary = json.loads((run_dir / "train_summary.json").read_text())
    t0 = time.perf_counter()
    model = load_model(run_dir, "cpu")
    val = validation_metrics(model, data_dir, seed)
    slices, brain = probe_slices(model.cfg, data_dir)
    probe = patch_probe(model, slices, brain)
    row = {
        "variant": variant,
        "overrides": CHANGES[variant],
        "steps": summary["steps"],
        "seed": seed,
        "best_val_loss": summary["best_val_loss"],
        "validation": val,
        "probe_l1": probe["l1"],
        "probe_bands": [b["l1"] for b in probe["bands"]],
        "probe_per_draw": probe["per_draw"],
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "amp": model.cfg.train.amp,
    }
    tmp = result.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, result)
    return row


def collect(out: Path, variants: list[str]) -> str:
    lines = []
    for budget_dir in sorted(
        (p for p in out.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    ):
        rows = {}
        for v in variants:
            rows[v] = {
                int(f.parent.name[4:]): json.loads(f.read_text())
                for f in (budget_dir / slug(v)).glob("seed*/result.json")
            }
        ref = rows.get(REFERENCE, {})
        lines += [
            f"\n### {budget_dir.name} steps\n",
            "| variant | seeds | val Dice tumour (%) | val Dice MS (%) | val AUPRC tumour (%) | probe l1 (1e-3) | probe - cpu preset, paired (1e-3) | steps | train min / run |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for v in variants:
            rs = rows[v]
            if not rs:
                continue
            dice_t = [100 * r["validation"]["Brats21"]["val_dice"] for r in rs.values()]
            dice_m = [100 * r["validation"]["MSLUB"]["val_dice"] for r in rs.values()]
            ap_t = [100 * r["validation"]["Brats21"]["val_auprc"] for r in rs.values()]
            probe = [1e3 * r["probe_l1"] for r in rs.values()]
            diff = [1e3 * (rs[s]["probe_l1"] - ref[s]["probe_l1"]) for s in rs if s in ref]
            lines.append(
                f"| {v} | {len(rs)} | {mean_sd(dice_t)} | {mean_sd(dice_m)} | {mean_sd(ap_t)} "
                f"| {mean_sd(probe)} | {mean_sd(diff) if v != REFERENCE else '-'} "
                f"| {statistics.median(r['steps'] for r in rs.values()):.0f} "
                f"| {statistics.median(r['train_s'] for r in rs.values()) / 60:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, type=Path, help="synthetic benchmark (maediff synth)")
    ap.add_argument("--out", required=True, type=Path, help="the study's folder (resumable)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", nargs="+", type=int, default=[300, 3000], help="step budgets")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_job_arguments(ap)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.collect:
        print(collect(args.out, args.variants))
        return
    todo = pick(jobs(args.variants, args.steps, args.seeds), args.run_index)
    if args.list:
        for steps, seed, v in todo:
            print(f"{steps:>6} steps  seed {seed}  {v}")
        return
    for steps, seed, v in todo:
        row = run_job(args.data, args.out, steps, seed, v)
        short = {k: row[k] for k in ("variant", "steps", "seed", "probe_l1", "train_s", "eval_s")}
        print(json.dumps({**short, "validation": row["validation"]}), flush=True)
    print(collect(args.out, args.variants))


if __name__ == "__main__":
    main()
