"""Lesion-guided patch selection (inference.patch_selection=guided) against the paper's
Alg. 2 on one trained model: the whole protocol (Dice, AUPRC, l1) on the first N
volumes of every split, seconds per volume, and the share of (slice, patch) pairs the
guided pass denoises. One process, the same noise seed for both.

    python benchmarks/bench_guided.py --model RUN --data data/synthetic --volumes 6 \
        --quantiles 0.8 0.9 --json guided.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maediff.data.datasets import load_subject
from maediff.pipeline.detect import reconstruct_volume
from maediff.pipeline.evaluate import evaluate_model, plan_evaluation
from maediff.weights import load_model


def run(model_dir: str, data: str, volumes: int, overrides: list[str], seed: int) -> dict:
    model = load_model(model_dir, torch.device("cpu"), overrides)
    plan = plan_evaluation(data, max_volumes=volumes)
    n = len(plan.subjects())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = evaluate_model(
            model,
            data,
            Path(tmp) / "eval",
            max_volumes=volumes,
            seed=seed,
            workers=0,
            n_jobs=1,
            progress=False,
            figures=False,
        )
        seconds = time.perf_counter() - t0
    row = {
        "setting": " ".join(overrides) or "Alg. 2 (all patches)",
        "seconds_per_volume": seconds / n,
        "volumes": n,
    }
    for ds in ("Brats21", "MSLUB"):
        row[f"{ds}_dice"] = 100 * s.mean(ds, "dice")
        row[f"{ds}_auprc"] = 100 * s.mean(ds, "auprc")
        row[f"{ds}_lesion_f1"] = 100 * (s.datasets[ds].lesions.lesion_f1 or 0.0)
    row["IXI_l1"] = 1000 * s.mean("IXI", "l1")
    if getattr(model.cfg.inference, "patch_selection", "all") == "guided":
        fractions = []
        for subj in plan.anomaly["Brats21"][1][:2] + plan.anomaly["MSLUB"][1][:2]:
            vol = load_subject(subj, model.cfg.data)
            reconstruct_volume(
                model, vol, torch.Generator().manual_seed(seed), skip_empty_patches=False
            )
            fractions.append(model.last_guided["fraction"])
        row["pairs_denoised"] = float(np.mean(fractions))
    else:
        row["pairs_denoised"] = 1.0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="run folder or checkpoint")
    ap.add_argument("--data", required=True, help="data in pDDPM's layout")
    ap.add_argument("--volumes", type=int, default=6, help="first N volumes of every split")
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.9])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = [run(args.model, args.data, args.volumes, [], args.seed)]
    for q in args.quantiles:
        over = ["inference.patch_selection=guided", f"inference.guided_quantile={q}"]
        rows.append(run(args.model, args.data, args.volumes, over, args.seed))
    cols = [
        "Brats21_dice",
        "Brats21_auprc",
        "Brats21_lesion_f1",
        "MSLUB_dice",
        "MSLUB_auprc",
        "IXI_l1",
        "pairs_denoised",
        "seconds_per_volume",
    ]
    print("| setting | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['setting']} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
