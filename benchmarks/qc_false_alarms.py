"""How often detect's checks against the training data (data/qc.py) flag scans of the
synthetic benchmark: healthy test scans and lesion scans (validation and test) of each
data set, against a model's record of its training data. Every scan here is one the
model should take, so every flag is a false alarm. The checks run before scoring, so
no reconstruction is needed.

    maediff synth -o data/synthetic
    maediff synth --site b -o data/synthetic-b
    python benchmarks/qc_false_alarms.py data/synthetic data/synthetic-b

--model defaults to the shipped model (maediff-cpu), whose record was measured on
site a's IXI fold 0 training scans.
"""

from __future__ import annotations

import argparse
from collections import Counter

from maediff.data.datasets import load_subject
from maediff.data.qc import check_scan, measure_subject
from maediff.data.splits import read_pddpm_split
from maediff.names import HEALTHY, MS, TUMOUR, shown_name
from maediff.pretrained import checkpoint_path
from maediff.training.checkpoint import read_checkpoint

SETS = ((HEALTHY, ("test",)), (TUMOUR, ("val", "test")), (MS, ("val", "test")))


def flag_counts(data_dir: str, cfg) -> list[tuple[str, int, Counter, int]]:
    """(data set, scans, flags counted, scans with any flag) of each set."""
    rows = []
    for ds, splits in SETS:
        subjects = [s for split in splits for s in read_pddpm_split(data_dir, ds, split)]
        flags: Counter = Counter()
        flagged = 0
        for s in subjects:
            found = check_scan(measure_subject(s, load_subject(s, cfg.data)), cfg.data.trained_on)
            flags.update(name for name, _ in found)
            flagged += bool(found)
        rows.append((shown_name(ds), len(subjects), flags, flagged))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="synthetic benchmarks (maediff synth), one per site")
    ap.add_argument("--model", help="model file or run (default: the shipped maediff-cpu)")
    args = ap.parse_args(argv)
    cfg, _, _ = read_checkpoint(args.model or checkpoint_path())
    if not cfg.data.trained_on.scans:
        raise SystemExit(f"{args.model}: the model records nothing of its training data")
    print("| data | set | scans | flagged | share | flags |")
    print("|---|---|---|---|---|---|")
    for data in args.data:
        for name, n, flags, flagged in flag_counts(data, cfg):
            shown = ", ".join(f"{k} {v}" for k, v in sorted(flags.items())) or "-"
            print(f"| {data} | {name} | {n} | {flagged} | {flagged / max(n, 1):.0%} | {shown} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
