"""How many test volumes does a paired comparison of two rows need? Sized from the data:
the per-subject spread of the difference between two evaluated rows on the same test
volumes (printed with the mean difference, its 95 % bootstrap interval and the paired
tests' p, as the benchmark's paired table gives them, also for rows of two benchmark
folders), then the number of subjects for which a two-sided paired t-test at p < 0.05
detects a given true difference (default 3 Dice points) with 80 % power
(maediff.evaluation.paired.subjects_needed: noncentral t, exact for normal differences).

    python benchmarks/power_sizing.py --a evalA --b evalB
    python benchmarks/power_sizing.py --a seed0/eval seed1/eval --b other0/eval other1/eval

--a and --b take one `maediff evaluate` folder per seed of each row (its
DATASET_test_subjects.csv files). A subject's values are averaged over the row's seeds
first, as the benchmark's paired table does; the spread of the differences shrinks with
more seeds only in its seed part, so size with the seed count the tables will use.

    python benchmarks/power_sizing.py --metric probe --a runA/eval --b runB/eval

pairs two rows' patch probes (probe.json beside each evaluate folder, as in a benchmark
run folder) over the probe's slices, each slice's in-patch l1 averaged over its draws
and the row's seeds, as the benchmark's paired table does for rows of one folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from maediff.benchmark.collect import probe_draws, probe_units
from maediff.evaluation.paired import paired_difference, power_paired_t, subjects_needed
from maediff.names import ANOMALY_SETS, shown_name
from maediff.reporting.files import read_subject_csv


def read_rows(folders: list[Path], dataset: str, metric: str) -> tuple[list[str], np.ndarray]:
    """(subjects, (seeds, subjects) values) of one row; every seed must hold the same subjects."""
    subjects: list[str] | None = None
    values = []
    for f in folders:
        path = f / f"{dataset}_test_subjects.csv"
        if not path.exists():
            raise SystemExit(
                f"{path}: no per-subject results (is {f} a `maediff evaluate` folder?)"
            )
        rows = sorted(read_subject_csv(path, [metric]), key=lambda r: r[0])
        names = [name for name, _ in rows]
        if subjects is not None and names != subjects:
            raise SystemExit(f"{path}: not the same test subjects as {folders[0]}")
        subjects = names
        values.append([v[metric] for _, v in rows])
    return subjects or [], np.array(values)


def difference_cells(d) -> dict:
    """The paired difference's cells, in points (x 100), as the benchmark shows them."""
    return {
        "mean a - b": 100 * d.mean,
        "95 % interval": f"{100 * d.ci[0]:+.2f} to {100 * d.ci[1]:+.2f}",
        "p (paired t)": f"{d.p_t:.2g}",
        "p (Wilcoxon)": f"{d.p_wilcoxon:.2g}",
        "sd of differences": 100 * d.sd,
    }


def sizing(a: list[Path], b: list[Path], dataset: str, metric: str, delta: float) -> dict:
    sa, va = read_rows(a, dataset, metric)
    sb, vb = read_rows(b, dataset, metric)
    if sa != sb:
        raise SystemExit(f"{dataset}: the two rows were evaluated on different test subjects")
    d = paired_difference(va, vb)
    need = subjects_needed(d.sd, delta) if d.sd > 0 else 2
    return {
        "data set": shown_name(dataset),
        "subjects": d.n,
        **difference_cells(d),
        f"power now ({100 * delta:g} points)": power_paired_t(d.n, d.sd, delta),
        f"subjects for {100 * delta:g} points": need,
    }


def read_probe(folders: list[Path]) -> np.ndarray:
    """(seeds, slices) in-patch l1 of one row's patch probe, read from probe.json beside
    each evaluate folder (a benchmark run folder holds both); every seed must have drawn
    the same (t, noise, position) draws, as the benchmark's runs do."""
    units, draws = [], None
    for f in folders:
        path = f.parent / "probe.json"
        if not path.exists():
            raise SystemExit(f"{path}: no patch probe (is {f} the eval folder of a benchmark run?)")
        p = json.loads(path.read_text())
        u = probe_units(p)
        if u is None:
            raise SystemExit(f"{path}: no per-draw values to pair (a probe from before 0.6.0)")
        if draws is not None and probe_draws(p) != draws:
            raise SystemExit(f"{path}: other probe draws than {folders[0].parent / 'probe.json'}")
        draws = probe_draws(p)
        units.append(u)
    return np.array(units)


def probe_sizing(a: list[Path], b: list[Path]) -> dict:
    va, vb = read_probe(a), read_probe(b)
    if va.shape[1] != vb.shape[1]:
        raise SystemExit("the two rows' probes have different slices")
    d = paired_difference(va, vb)
    return {
        "measure": "in-patch l1 (x 100)",
        "probe slices": d.n,
        **difference_cells(d),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--a", nargs="+", type=Path, required=True, help="evaluate folders, one per seed"
    )
    ap.add_argument(
        "--b", nargs="+", type=Path, required=True, help="evaluate folders, one per seed"
    )
    ap.add_argument(
        "--metric",
        default="dice",
        choices=["dice", "auprc", "probe"],
        help="probe: the patch probe's in-patch l1 per probe slice, from probe.json beside "
        "each evaluate folder (lower is better; no sizing, the units are slices)",
    )
    ap.add_argument("--delta", type=float, default=3.0, help="difference to detect, in points")
    args = ap.parse_args()
    if args.metric == "probe":
        rows = [probe_sizing(args.a, args.b)]
    else:
        rows = [sizing(args.a, args.b, ds, args.metric, args.delta / 100) for ds in ANOMALY_SETS]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")
    tail = (
        "paired over the probe's slices (the same draws)"
        if args.metric == "probe"
        else "two-sided paired t-test, alpha 0.05, power 0.8"
    )
    print(f"\n{args.metric}, {len(args.a)} against {len(args.b)} seed(s); {tail}")


if __name__ == "__main__":
    main()
