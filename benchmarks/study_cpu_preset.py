"""The `cpu` preset study: validation loss after a fixed wall-clock training budget
for a few widths and depths, on the synthetic benchmark. Prints a table.

    maediff synth -o data/synthetic
    python benchmarks/study_cpu_preset.py --data data/synthetic --minutes 3

All variants keep the cpu preset's geometry (48x48, p=24, s=8, r=8: K=16, N=36),
noise, schedule and validation protocol, so their validation losses compare.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from maediff.config import apply_overrides, get_preset
from maediff.training.data import prepare_training_data
from maediff.training.trainer import train

VARIANTS = {
    "32ch x1 (preset)": [],
    "48ch x1": ["unet.model_channels=48", "unet.num_head_channels=16"],
    "32ch x2": ["unet.num_res_blocks=2"],
    "32ch x1, MAE 256": ["mae.enc_dim=256", "mae.dec_dim=256"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    base = get_preset("cpu")
    data = prepare_training_data(base, args.data, progress=False)
    rows = []
    for name in args.variants:
        cfg = apply_overrides(
            base, VARIANTS[name] + [f"train.max_minutes={args.minutes}", "train.val_every=5"]
        )
        with tempfile.TemporaryDirectory() as tmp:
            s = train(cfg, data, Path(tmp) / "run", device="cpu", progress=False)
        rows.append((name, s["parameters"], s["steps"], s["best_val_loss"]))
        print(
            json.dumps(
                {"variant": name, **{k: s[k] for k in ("parameters", "steps", "best_val_loss")}}
            ),
            flush=True,
        )
    print(f"\n| variant | parameters | steps in {args.minutes:g} min | best validation loss |")
    print("|---|---|---|---|")
    for name, n, steps, v in rows:
        print(f"| {name} | {n / 1e6:.2f} M | {steps} | {v:.4f} |")


if __name__ == "__main__":
    main()
