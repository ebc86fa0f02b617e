"""What does more compute give? The learning curve at the `cpu` scale: MAEDiff and two
baselines trained for growing step budgets, each evaluated by the protocol on the full
test sets of the synthetic benchmark (`maediff evaluate`: threshold on validation, Dice,
AUPRC and healthy l1 on test).

    maediff synth -o data/synthetic
    python benchmarks/learning_curve.py --data data/synthetic --out curve --run-index 0 2 &
    python benchmarks/learning_curve.py --data data/synthetic --out curve --run-index 1 2 &
    wait; python benchmarks/learning_curve.py --data data/synthetic --out curve --collect --figure docs/img

The rows (`--list` prints the jobs): MAEDiff (the `cpu` preset as this release defines it)
at 300, 1,000, 3,000 and 10,000 steps, seeds 0-2 up to 1,000 steps and seed 0 beyond;
pDDPM s48 and the AE at 300, 1,000 and 3,000 steps, seed 0; "MAEDiff 96 px", the `cpu`
widths at the data's full 96 px (patch 48, stride 16, 16x16 MAE tokens) for 1,000 steps,
seed 0. Every budget is its own run (the learning-rate schedule spans the budget), not a
snapshot of a longer one. `--amp none` trains and evaluates in fp32 on any CPU (the
preset's `auto` picks bf16 where the CPU has it); each result records what it ran with.

Each job lives in OUT/<model>/<steps>/seed<N>/: `run/` (the training run, resumed where
it was cut), `eval/` (evaluate's folder) and `result.json`, written last. Jobs are ordered
by cost, cheapest first, and each process runs single-threaded (`--threads`), so two
processes share 2 cores without slowing each other much; an interrupted curve resumes
where it stopped.

`--collect` prints the table (mean ± std over the finished seeds); `--figure DIR` writes
DIR/learning_curve.png (tumour Dice, AUPRC and healthy l1 against steps, log axis),
DIR/learning_curve_reconstructions.png (one test slice reconstructed by MAEDiff seed 0 at
every finished budget, with its anomaly map) and, once the 96 px row and MAEDiff at its
budget have run, DIR/learning_curve_96px.png (an MS and a tumour slice through both).
`--recorded` adds the points measured for the docs (learning_curve_recorded.csv: one row
per point, its seeds' mean and standard deviation, the CPU, the autocast and the
release) where OUT has fewer seeds of them, so one folder's new points join the
published curve; `--model-at STEPS=MODEL` puts a model into the reconstructions figure
at a budget OUT has no run of (the shipped model is the 3,000-step run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from study_tools import add_job_arguments, cpu_name, pick, slug

MODELS = {  # row -> (model, budgets)
    "MAEDiff": ("maediff", (300, 1000, 3000, 10000)),
    "pDDPM s48": ("pddpm-s48", (300, 1000, 3000)),
    "AE": ("ae", (300, 1000, 3000)),
    "MAEDiff 96 px": ("maediff", (1000,)),
}
# rows that change the preset: the data's full 96 px resolution with the `cpu` widths, the
# patch, stride and MAE token grid scaled with the image (16 patch positions of 48 px, 6 px
# tokens, as at 48 px), to measure what the small MS lesions need
ROW_SETTINGS = {
    "MAEDiff 96 px": (
        "geometry.image_size=96", "geometry.patch_size=48", "geometry.stride=16",
        "geometry.grid_size=16",
    ),
}  # fmt: skip


def seeds_of(row: str, steps: int) -> int:
    """3 seeds for MAEDiff up to 1,000 steps, 1 otherwise."""
    return 3 if row == "MAEDiff" and steps <= 1000 else 1


def jobs(
    rows: list[str] | None = None, budgets: list[int] | None = None, seeds: int | None = None
) -> list[tuple[str, int, int]]:
    """(row, steps, seed), cheapest first: by budget, then seed, then row. `budgets` and
    `seeds` replace every row's budgets and seed count (smaller studies, tests)."""
    out = [
        (row, steps, seed)
        for row in rows or list(MODELS)
        for steps in budgets or MODELS[row][1]
        for seed in range(seeds or seeds_of(row, steps))
    ]
    return sorted(out, key=lambda j: (j[1], j[2], list(MODELS).index(j[0])))


def maediff_command() -> list[str]:
    return [sys.executable, "-m", "maediff"]


def _env(threads: int) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def train_command(
    data: Path,
    run_dir: Path,
    row: str,
    steps: int,
    seed: int,
    scale: str = "cpu",
    amp: str | None = None,
) -> list[str]:
    """`maediff train` for one job: the row's preset at `scale`, its own settings
    (ROW_SETTINGS), the budget as the whole schedule, the seed and the autocast."""
    cmd = maediff_command() + [
        "train", "--data", str(data), "--run-dir", str(run_dir),
        "--preset", f"{MODELS[row][0]}-{scale}",
        "--set", f"train.max_steps={steps}", "--set", "train.max_minutes=0",
        "--set", "train.epochs=null", "--set", f"train.seed={seed}", "--device", "cpu", "-q",
    ]  # fmt: skip
    for setting in ROW_SETTINGS.get(row, ()):
        cmd += ["--set", setting]
    if amp:
        cmd += ["--set", f"train.amp={amp}"]
    return cmd


def run_job(
    data: Path,
    out: Path,
    row: str,
    steps: int,
    seed: int,
    threads: int,
    scale: str = "cpu",
    amp: str | None = None,
) -> dict:
    folder = out / slug(row) / str(steps) / f"seed{seed}"
    result = folder / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    preset = f"{MODELS[row][0]}-{scale}"
    run_dir, eval_dir = folder / "run", folder / "eval"
    env = _env(threads)
    t0 = time.perf_counter()
    if not (run_dir / "train_summary.json").exists():
        cmd = train_command(data, run_dir, row, steps, seed, scale, amp)
        if (run_dir / "last.state.safetensors").exists():
            cmd.append("--resume")
        elif run_dir.exists():  # killed before its first checkpoint: nothing trained to keep
            cmd.append("--overwrite")
        subprocess.run(cmd, check=True, env=env)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (eval_dir / "summary.json").exists():
        cmd = maediff_command() + [
            "evaluate", "--model", str(run_dir), "--data", str(data), "-o", str(eval_dir),
            "--workers", "0", "--device", "cpu", "-q", "--overwrite",
        ]  # fmt: skip
        if amp:
            cmd += ["--amp", amp]
        subprocess.run(cmd, check=True, env=env)
    eval_s = time.perf_counter() - t0
    summary = json.loads((eval_dir / "summary.json").read_text())
    train_summary = json.loads((run_dir / "train_summary.json").read_text())
    row_out = {
        "row": row,
        "preset": preset,
        "steps": train_summary["steps"],
        "seed": seed,
        "metrics": metrics_of(summary),
        "train_s": round(training_seconds(run_dir, train_s), 1),
        "eval_s": round(eval_s, 1),
        "threads": threads,
        "cpu": cpu_name(),
        "amp": used_amp(amp),
    }
    tmp = result.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row_out, indent=2))
    os.replace(tmp, result)
    return row_out


def _dataset(summary: dict, name: str) -> dict:
    for key, value in summary["datasets"].items():
        if key.lower() == name.lower():
            return value
    raise KeyError(f"{name} not in the summary's data sets {list(summary['datasets'])}")


def used_amp(amp: str | None) -> str:
    """The autocast the job ran with on this CPU: `amp`, or the `cpu` preset's `auto`
    resolved (bf16 only where the CPU computes it natively)."""
    import torch

    from maediff.device import resolve_amp

    return resolve_amp(amp or "auto", torch.device("cpu"))


def metrics_of(summary: dict) -> dict:
    """Tumour and MS Dice/AUPRC and healthy l1 of one evaluate summary, in %, % and 1e-3."""
    out = {}
    for short, name in (("tumour", "Brats21"), ("ms", "MSLUB")):
        m = _dataset(summary, name)["metrics"]
        out[f"{short}_dice"] = 100 * m["dice"]["mean"]
        out[f"{short}_auprc"] = 100 * m["auprc"]["mean"]
    out["healthy_l1"] = 1e3 * _dataset(summary, "IXI")["metrics"]["l1"]["mean"]
    return out


def training_seconds(run_dir: Path, measured: float) -> float:
    """The run's whole training time: train_summary.json's minutes, which add up the
    sessions of a resumed run (the job's own clock saw only its last session, or none)."""
    f = run_dir / "train_summary.json"
    if f.exists():
        minutes = json.loads(f.read_text()).get("minutes")
        if minutes is not None:
            return 60.0 * float(minutes)
    return measured


def finished(out: Path) -> dict[tuple[str, int], list[dict]]:
    """(row, steps) -> the result of every finished seed, whatever the job list."""
    rows: dict[tuple[str, int], list[dict]] = {}
    for f in sorted(out.glob("*/*/seed*/result.json")):
        r = json.loads(f.read_text())
        r["train_s"] = training_seconds(f.parent / "run", r["train_s"])
        rows.setdefault((r["row"], int(f.parent.parent.name)), []).append(r)
    return rows


KEYS = ("tumour_dice", "tumour_auprc", "ms_dice", "ms_auprc", "healthy_l1")


RECORDED = Path(__file__).with_name("learning_curve_recorded.csv")


def points(out: Path, recorded: Path | None = None) -> dict[tuple[str, int], dict]:
    """(row, steps) -> one point of the curve: its seeds, the mean and standard deviation
    (ddof 1; 0 for one seed) of each metric, the median training minutes, the CPU and the
    autocast, from the jobs finished in `out`; with `recorded` (a CSV of earlier
    measurements, one row per point: benchmarks/learning_curve_recorded.csv), its points
    too, where `out` has fewer seeds of them."""
    pts: dict[tuple[str, int], dict] = {}
    for key, rs in finished(out).items():
        pts[key] = {
            "seeds": len(rs),
            "mean": {k: statistics.mean(r["metrics"][k] for r in rs) for k in KEYS},
            "sd": {
                k: statistics.stdev(r["metrics"][k] for r in rs) if len(rs) > 1 else 0.0
                for k in KEYS
            },
            "train_min": statistics.median(r["train_s"] for r in rs) / 60,
            "cpu": rs[0].get("cpu", ""),
            "amp": str(rs[0].get("amp", "")),
        }
    if recorded is None:
        return pts
    with open(recorded, newline="") as f:
        for n, rec in enumerate(csv.DictReader(f), start=2):
            try:
                key = (rec["row"], int(rec["steps"]))
                if key[0] not in MODELS:
                    raise ValueError(f"no row {key[0]!r} (rows: {', '.join(MODELS)})")
                seeds = int(rec["seeds"])
                point = {
                    "seeds": seeds,
                    "mean": {k: float(rec[k]) for k in KEYS},
                    "sd": {k: float(rec[f"{k}_sd"] or 0) for k in KEYS},
                    "train_min": float(rec["train_min"]),
                    "cpu": rec["cpu"],
                    "amp": rec["amp"],
                }
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{recorded}, line {n}: {e!r}") from e
            if key not in pts or pts[key]["seeds"] < seeds:
                pts[key] = point
    return pts


def _cell(point: dict, key: str) -> str:
    mean, sd = point["mean"][key], point["sd"][key]
    return f"{mean:.2f} ± {sd:.2f}" if point["seeds"] > 1 else f"{mean:.2f}"


def collect(out: Path, recorded: Path | None = None) -> str:
    lines = [
        "| model | steps | seeds | tumour Dice (%) | tumour AUPRC (%) | MS Dice (%) | MS AUPRC (%) | healthy l1 (1e-3) | train min / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pts = points(out, recorded)
    for row, steps in sorted(pts, key=lambda k: (list(MODELS).index(k[0]), k[1])):
        p = pts[(row, steps)]
        cells = " | ".join(_cell(p, k) for k in KEYS)
        lines.append(f"| {row} | {steps} | {p['seeds']} | {cells} | {p['train_min']:.1f} |")
    return "\n".join(lines)


def figure(
    out: Path,
    data: Path,
    folder: Path,
    recorded: Path | None = None,
    extra_models: dict[int, Path] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = points(out, recorded)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("tumour_dice", "tumour Dice (%)"), ("tumour_auprc", "tumour AUPRC (%)"),
              ("healthy_l1", "healthy l1 (1e-3)"))  # fmt: skip
    for name in MODELS:
        budgets = sorted(s for (r, s) in rows if r == name)
        if not budgets:
            continue
        for ax, (key, label) in zip(axes, panels):
            mean = [rows[(name, s)]["mean"][key] for s in budgets]
            sd = [rows[(name, s)]["sd"][key] for s in budgets]
            ax.errorbar(budgets, mean, yerr=sd, marker="o", capsize=3, label=name)
            ax.set_xscale("log")
            ax.set_xlabel("training steps")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    ticks = sorted({s for (_, s) in rows})
    for ax in axes:  # the budgets themselves, in plain numbers (no overlapping minor labels)
        ax.set_xticks(ticks, [f"{s:,}" for s in ticks])
        ax.minorticks_off()
    axes[0].legend()
    cpus = ", ".join(sorted({p["cpu"] for p in rows.values()}))
    amps = sorted({p["amp"] for p in rows.values()})
    precision = "fp32" if amps == ["none"] else "autocast " + ", ".join(amps)
    fig.suptitle(f"Learning curve at the cpu scale, demo test sets ({cpus}, {precision})")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "learning_curve.png", dpi=110)
    plt.close(fig)
    reconstructions(out, data, folder, extra_models)
    resolution_figure(out, data, folder)


def reconstructions(
    out: Path, data: Path, folder: Path, extra_models: dict[int, Path] | None = None
) -> None:
    """One tumour test slice through MAEDiff seed 0 at every budget it has finished
    training for, and through `extra_models` (budget -> model file or run folder) at
    budgets `out` has no trained run of."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from maediff.data.datasets import load_subject
    from maediff.data.splits import read_pddpm_split
    from maediff.pipeline.detect import reconstruct_volume
    from maediff.weights import load_model

    trained = {
        int(f.parent.parent.parent.name): f.parent
        for f in out.glob("maediff/*/seed0/run/train_summary.json")
    }
    runs = sorted({**(extra_models or {}), **trained}.items())
    if not runs:
        return
    subject = read_pddpm_split(data, "Brats21", "test")[0]
    fig, axes = plt.subplots(2, len(runs) + 1, figsize=(2.6 * (len(runs) + 1), 5.4))
    axes = np.asarray(axes).reshape(2, -1)
    for i, (steps, run_dir) in enumerate(runs):
        model = load_model(run_dir, "cpu")
        vol = load_subject(subject, model.cfg.data)
        z = int(np.argmax((vol.segmentation > 0).sum(axis=(0, 1))))
        img = vol.image[..., z]
        r = reconstruct_volume(model, vol.image[..., z : z + 1], torch.Generator().manual_seed(0))
        r = r[..., 0]
        if i == 0:
            axes[0, 0].imshow(img.T, cmap="gray", origin="lower", vmin=0, vmax=1)
            axes[0, 0].set_title("input")
            axes[1, 0].imshow((vol.segmentation[..., z] > 0).T, cmap="gray", origin="lower")
            axes[1, 0].set_title("lesion")
        axes[0, i + 1].imshow(r.T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[0, i + 1].set_title(f"{steps} steps")
        axes[1, i + 1].imshow(np.abs(img - r).T, cmap="inferno", origin="lower", vmin=0, vmax=0.5)
        axes[1, i + 1].set_title("|x - rec|")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "learning_curve_reconstructions.png", dpi=110)
    plt.close(fig)


def resolution_figure(out: Path, data: Path, folder: Path) -> None:
    """48 px against the data's 96 px, MAEDiff seed 0 at the 96 px row's budget: the MS
    and the tumour test subject with the most lesion on one slice, on the data's grid,
    through each model (the input with the lesion's outline, the reconstruction, |x - rec|),
    written to learning_curve_96px.png once both runs have finished."""
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from maediff.data.datasets import load_subject
    from maediff.data.splits import read_pddpm_split
    from maediff.pipeline.detect import reconstruct_volume
    from maediff.weights import load_model

    done = sorted(
        out.glob(f"{slug('MAEDiff 96 px')}/*/seed0/result.json"),
        key=lambda f: int(f.parent.parent.name),
    )
    if not done:
        return
    steps = done[-1].parent.parent.name
    base = out / "maediff" / steps / "seed0"
    if not (base / "result.json").exists():
        return
    models = [("48 px", load_model(base / "run", "cpu")),
              ("96 px", load_model(done[-1].parent / "run", "cpu"))]  # fmt: skip
    fig, axes = plt.subplots(2, 6, figsize=(15.6, 5.6))
    for row, name in enumerate(("MSLUB", "Brats21")):
        best = None  # the subject with the largest lesion area on one slice
        for subject in read_pddpm_split(data, name, "test")[:6]:
            vol = load_subject(subject, models[1][1].cfg.data)  # the data's grid, both models
            area = (vol.segmentation > 0).sum(axis=(0, 1))
            if best is None or area.max() > best[0]:
                best = (int(area.max()), subject, vol, int(np.argmax(area)))
        _, subject, vol, z = best
        img = vol.image[..., z]
        panels = []
        for label, model in models:  # each resizes the slice to its own input size
            gen = torch.Generator().manual_seed(0)
            rec = reconstruct_volume(model, vol.image[..., z : z + 1], gen)[..., 0]
            panels += [
                (f"{name} {subject.name}", img, "gray", 1.0, vol.segmentation[..., z]),
                (f"{label}, {steps} steps", rec, "gray", 1.0, None),
                (f"{label}: |x - rec|", np.abs(img - rec), "inferno", 0.5, None),
            ]
        for ax, (title, im, cmap, vmax, lesion) in zip(axes[row], panels):
            ax.imshow(im.T, cmap=cmap, origin="lower", vmin=0, vmax=vmax)
            if lesion is not None:  # the lesion's outline over the input
                ax.contour((lesion > 0).T.astype(float), levels=[0.5], colors="c", linewidths=0.7)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "learning_curve_96px.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, type=Path, help="synthetic benchmark (maediff synth)")
    ap.add_argument("--out", required=True, type=Path, help="the curve's folder (resumable)")
    add_job_arguments(ap, threads=1)
    ap.add_argument("--rows", nargs="+", choices=list(MODELS), help="only these rows")
    ap.add_argument("--budgets", nargs="+", type=int, help="these budgets for every row")
    ap.add_argument("--seeds", type=int, help="this many seeds for every job")
    ap.add_argument("--scale", default="cpu", choices=("cpu", "tiny"), help="presets' scale")
    ap.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16", "auto"),
        help="autocast of training and evaluation (default: the preset's, `auto`); "
        "`none` measures fp32 on any CPU",
    )
    ap.add_argument("--figure", type=Path, metavar="DIR", help="write the figures into DIR")
    ap.add_argument(
        "--recorded",
        type=Path,
        nargs="?",
        const=RECORDED,
        metavar="CSV",
        help="with --collect/--figure: add the points recorded in CSV (default: "
        f"{RECORDED.name}, the curve as measured for the docs) where OUT has fewer seeds",
    )
    ap.add_argument(
        "--model-at",
        action="append",
        default=[],
        metavar="STEPS=MODEL",
        help="with --figure: MODEL (a model file or run folder) stands for MAEDiff seed 0 at "
        "STEPS in the reconstructions figure where OUT has no trained run of that budget "
        "(the shipped model is the 3,000-step run)",
    )
    args = ap.parse_args()
    if args.collect or args.figure:
        extra = {}
        for item in args.model_at:
            steps, sep, model = item.partition("=")
            if not sep or not steps.isdigit() or not Path(model).exists():
                ap.error(f"--model-at {item!r}: give STEPS=MODEL with an existing MODEL")
            extra[int(steps)] = Path(model)
        print(collect(args.out, args.recorded))
        if args.figure:
            figure(args.out, args.data, args.figure, args.recorded, extra)
        return
    todo = pick(jobs(args.rows, args.budgets, args.seeds), args.run_index)
    if args.list:
        for row, steps, seed in todo:
            print(f"{row:>13}  {steps:>6} steps  seed {seed}")
        return
    for row, steps, seed in todo:
        r = run_job(args.data, args.out, row, steps, seed, args.threads, args.scale, args.amp)
        print(json.dumps({k: r[k] for k in ("row", "steps", "seed", "metrics", "train_s", "eval_s")}),
              flush=True)  # fmt: skip
    print(collect(args.out))


if __name__ == "__main__":
    main()
