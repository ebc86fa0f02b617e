"""Site robustness and noise ensembles at the demo budget: train the `cpu` preset on
site A's healthy scans (with and without intensity augmentation), evaluate on site A
and on site B, optionally with histogram standardisation or a noise ensemble at test
time. Every step is a `maediff` command; a finished step is skipped, so the study
resumes where it stopped. Prints one table of tumour Dice / AUPRC.

    maediff synth -o SITES/A && maediff synth -o SITES/B --site b
    python benchmarks/study_sites.py --sites SITES --out STUDY [--seeds 0 1 2]

Variants: base (the cpu preset), aug (augment.enabled=true), both trained on site A;
onB (the cpu preset trained on site B: what B's own healthy scans give). Test-time options:
nyul (data.standardise=nyul), ens (inference.ensemble_t=[250,500,750]).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from maediff.reporting.summary import EvaluationSummary

VARIANTS = {"base": [], "aug": ["augment.enabled=true"], "onB": []}
TRAIN_SITE = {"base": "A", "aug": "A", "onB": "B"}
TEST_OPTIONS = {
    "": [],
    "nyul": ["data.standardise=nyul"],
    "ens": ["inference.ensemble_t=[250,500,750]"],
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(out: Path, variant: str, seed: int, data: Path, minutes: float | None) -> Path:
    rd = out / f"{variant}-s{seed}"
    if not (rd / "train_summary.json").exists():
        sets = [*VARIANTS[variant], f"train.seed={seed}"]
        if minutes is not None:
            sets.append(f"train.max_minutes={minutes}")
        cmd = ["maediff", "train", "--data", str(data), "--run-dir", str(rd), "-q"]
        cmd += ["--preset", "cpu", *[a for s in sets for a in ("--set", s)]]
        if rd.exists():
            cmd.append("--overwrite")
        run(cmd)
    return rd


def evaluate(rd: Path, site: str, data: Path, option: str, max_volumes: int, seed: int) -> Path:
    ev = rd.parent / f"{rd.name}-on{site}{'-' + option if option else ''}"
    if not (ev / "summary.json").exists():
        cmd = ["maediff", "evaluate", "--model", str(rd), "--data", str(data), "-o", str(ev)]
        cmd += ["--datasets", "Brats21", "--no-ixi", "--max-volumes", str(max_volumes), "-q"]
        cmd += ["--seed", str(seed), *[a for s in TEST_OPTIONS[option] for a in ("--set", s)]]
        run(cmd)
    return ev


def metrics(ev: Path) -> tuple[float, float, float]:
    d = EvaluationSummary.read(ev).datasets["Brats21"]
    return 100 * d.mean("dice"), 100 * d.mean("auprc"), d.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sites", required=True, help="folder holding A/ and B/ (maediff synth)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["base", "aug"], choices=list(VARIANTS))
    ap.add_argument("--max-volumes", type=int, default=3, help="per split (validation, test)")
    ap.add_argument("--minutes", type=float, help="training budget (default: the preset's)")
    ap.add_argument(
        "--extra",
        nargs="*",
        default=["base:B:nyul", "aug:B:nyul", "base:A:ens"],
        help="VARIANT:SITE:OPTION evaluations of the first seed",
    )
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    sites, out = Path(args.sites), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = []  # the plain evaluations of every seed first, the test-time options last
    for seed in args.seeds:
        for v in args.variants:
            plan += [(v, seed, site, "") for site in (("B",) if v == "onB" else ("A", "B"))]
    for v in args.variants:
        plan += [(v, args.seeds[0], *e.split(":")[1:]) for e in args.extra if e.startswith(v + ":")]
    if not args.table_only:
        for v, seed, site, opt in plan:
            rd = train(out, v, seed, sites / TRAIN_SITE[v], args.minutes)
            evaluate(rd, site, sites / site, opt, args.max_volumes, seed)
    rows: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    for v, seed, site, opt in plan:
        ev = out / f"{v}-s{seed}-on{site}{'-' + opt if opt else ''}"
        if (ev / "summary.json").exists():
            rows.setdefault((v, site, opt), []).append(metrics(ev))
    print("| training | test site | test-time | seeds | tumour Dice | AUPRC | s (val + test) |")
    print("|---|---|---|---|---|---|---|")
    for (v, site, opt), vals in sorted(rows.items()):
        dice = [x[0] for x in vals]
        auprc = [x[1] for x in vals]
        sd = f" ± {statistics.stdev(dice):.1f}" if len(dice) > 1 else ""
        print(
            f"| {v} | {site} | {opt or '-'} | {len(vals)} | {statistics.mean(dice):.1f}{sd} "
            f"| {statistics.mean(auprc):.1f} | {statistics.median(x[2] for x in vals):.1f} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
