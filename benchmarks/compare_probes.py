"""Paired comparison of patch probes across benchmark folders: each variant's runs
against a reference row's runs of the same fold and seed (the draws are shared, so the
per-draw differences are paired). Prints, per variant: in-patch l1 (x 100), the
difference to the reference per seed (mean ± std over seeds), the per-draw paired
difference with its standard error, and the MAE input share.

    python benchmarks/compare_probes.py --reference bench/runs/ablation-unet \
        --variant "MAEDiff=bench/runs/ablation-unet-att-mae" \
        --variant "clean tokens=bench-clean/runs/ablation-unet-att-mae"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def probes(folder: Path) -> dict[str, dict]:
    """run name (fold0-seed1) -> probe.json contents, for every run with a probe."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/probe.json"))}


def compare(reference: Path, variants: dict[str, Path]) -> list[dict]:
    ref = probes(reference)
    if not ref:
        raise SystemExit(f"{reference} holds no run with a probe.json")
    rows = []
    for name, folder in variants.items():
        mine = probes(folder)
        pairs = sorted(set(mine) & set(ref))
        if not pairs:
            raise SystemExit(f"{folder} shares no fold and seed with {reference}")
        per_seed = [mine[k]["probe"]["l1"] - ref[k]["probe"]["l1"] for k in pairs]
        draws = np.concatenate(
            [
                np.asarray(mine[k]["probe"]["per_draw"]) - np.asarray(ref[k]["probe"]["per_draw"])
                for k in pairs
            ]
        )
        share = [mine[k]["mae"]["input_share"] for k in pairs if "mae" in mine[k]]
        rows.append(
            {
                "variant": name,
                "runs": pairs,
                "l1": float(np.mean([mine[k]["probe"]["l1"] for k in pairs])),
                "diff_mean": float(np.mean(per_seed)),
                "diff_std": float(np.std(per_seed)),
                "draw_diff": float(draws.mean()),
                "draw_se": float(draws.std(ddof=1) / np.sqrt(len(draws)))
                if len(draws) > 1
                else 0.0,
                "input_share": float(np.mean(share)) if share else None,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--reference", required=True, type=Path, help="runs folder of the reference row"
    )
    ap.add_argument("--variant", action="append", required=True, help="NAME=RUNS_FOLDER")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    variants = {}
    for v in args.variant:
        name, sep, folder = v.partition("=")
        if not sep:
            raise SystemExit(f"--variant takes NAME=FOLDER, got {v!r}")
        variants[name] = Path(folder)
    rows = compare(args.reference, variants)
    print(
        "| variant | runs | in-patch l1 | Δ reference, per seed | Δ reference, per draw (± s.e.) | MAE input share |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = "-" if r["input_share"] is None else f"{r['input_share']:.4f}"
        print(
            f"| {r['variant']} | {len(r['runs'])} | {100 * r['l1']:.2f} | "
            f"{100 * r['diff_mean']:+.3f} ± {100 * r['diff_std']:.3f} | "
            f"{100 * r['draw_diff']:+.3f} ± {100 * r['draw_se']:.3f} | {share} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
