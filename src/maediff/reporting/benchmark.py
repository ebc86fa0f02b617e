"""The benchmark's tables, texts and Figure 3 (`maediff benchmark`, benchmark/collect.py).

    probe_markdown(rows, reference)          # the patch probe of every probed model
    budget_markdown([("MAEDiff", "1000 updates of 32 slices")])
    figure3([("MAEDiff", run / "figure3.npz")], dest / "figure3.png")

What is written here was computed by benchmark/ and evaluation/: these functions take
labels, numbers and files and write Markdown, text and figures. figure3.npz is the file
format of a run's Figure 3 slices: keys "INDEX|SUBJECT|PART".
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .comparison import figure_comparison
from .tables import mean_std_text

# ------------------------------------------------------------------ Figure 3

FIGURE_PARTS = ("image", "segmentation", "reconstruction", "brain")


def figure_key(index: int | str, subject: str, part: str) -> str:
    """The key of one slice of figure3.npz: "INDEX|SUBJECT|PART"."""
    if part not in FIGURE_PARTS:
        raise ValueError(f"figure part {part!r} is not one of {FIGURE_PARTS}")
    return f"{index}|{subject}|{part}"


def split_figure_key(key: str) -> tuple[str, str, str]:
    """(index, subject, part) of a figure3.npz key."""
    parts = key.split("|")
    if len(parts) != 3 or parts[2] not in FIGURE_PARTS:
        raise ValueError(f"figure3.npz key {key!r} is not 'INDEX|SUBJECT|PART'")
    return parts[0], parts[1], parts[2]


def figure3(
    runs: Sequence[tuple[str, Path]], dest: Path, say: Callable[[str], None] = print
) -> Path | None:
    """Figure 3 from each model's figure3.npz (label, file): the same slices for every
    model; a model whose run has no file is left out (and said); None without any."""
    examples: dict[str, dict] = {}
    names = []
    for name, f in runs:
        if not f.exists():
            say(f"Figure 3 leaves out {name}: its run {f.parent} has no figure3.npz")
            continue
        names.append(name)
        try:
            read_figure_slices(f, name, examples)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"{f} is truncated or corrupted ({type(e).__name__}: {e}); delete the run's "
                f"folder {f.parent} to redo that run"
            ) from e
    if not examples:
        return None
    return figure_comparison([examples[k] for k in sorted(examples)], names, dest)


def read_figure_slices(f: Path, name: str, examples: dict[str, dict]) -> None:
    """The slices of one run's figure3.npz into `examples` (by slice index): the
    reconstruction and its anomaly map |x - reconstruction| inside the brain."""
    with np.load(f) as z:
        for key in z.files:
            idx, subject, part = split_figure_key(key)
            ex = examples.setdefault(idx, {"title": subject, "models": {}})
            if part in ("image", "segmentation", "brain"):
                ex[part] = z[key]
            else:
                rec = z[key]
                image = z[figure_key(idx, subject, "image")]
                brain = z[figure_key(idx, subject, "brain")]
                ex["models"][name] = (rec, np.abs(image - rec) * brain)


FIGURE3_TEXT = (
    "Per example: input and each model's reconstruction (top), ground truth and each "
    "model's anomaly map |x - reconstruction| inside the brain (bottom, each map from 0 to "
    "its own 99.5th percentile)."
)

# ------------------------------------------------------------------ texts

TABLE_TEXT = (
    "Mean ± sd (the sample sd, ddof 1) over runs (folds or seeds) of each run's per-volume "
    "mean; best bold, second underlined."
)
BUDGET_TEXT = (
    "Every model gets the same number of optimizer updates of each part that produces its "
    "reconstruction (docs/baselines.md, Budgets)."
)
LESION_TEXT = (
    "Lesion-wise detection of each model's runs: counts summed over runs (sensitivity by "
    "lesion volume: detected / lesions), lesion F1, sensitivity and false-positive "
    "components per volume averaged over runs (docs/evaluation.md, Results by lesion)."
)
PROBE_TEXT = (
    "In-patch l1 (x 100, image intensity units) of each diffusion model's x0 prediction on "
    "healthy validation slices, at draws of (t, noise field, patch position) fixed once and "
    "shared by every model and run, overall and per band of t; mean ± sd (sample sd) over runs. "
    "Δ U-Net: the paired difference to the plain U-Net run of the same fold and seed, "
    "mean ± sd over those pairs (negative: better inpainting). MAE input share: the "
    "fraction of the MAE branch's output energy that depends on the image (the rest is the "
    "same for every input at a patch position); MAE / f: the branch's rms relative to the "
    "feature map it is added to (benchmark/probe.py)."
)


def timing_text(seconds: float) -> str:
    return (
        f"Training and evaluation time of the finished runs, added up: {seconds / 60:.0f} min "
        "(runs done side by side in several processes overlap in wall time)."
    )


def subject_text(ref: str) -> str:
    """How to read the paired table against `ref` (the report's words)."""
    return (
        f"Each row: a model's difference to {ref} on the same test subjects (model − {ref}, "
        "percentage points). Each subject's value is first averaged over the model's runs "
        "(folds, seeds), so the subject is the unit; the difference is the mean of the "
        "per-subject differences, and the 95 % interval a percentile bootstrap over the "
        "subjects (10,000 resamples, seeded). The Wilcoxon signed-rank p and the paired "
        "t-test p test a mean difference of 0. A difference is resolved when the interval "
        "excludes 0 and the Wilcoxon p is below 0.05: the model is then higher or lower than "
        f"{ref} on these subjects (higher Dice and AUPRC are better). Not resolved means "
        "these subjects cannot tell the two apart, not that the two are equal: the interval "
        "shows how large a difference could still hide. With n subjects the exact Wilcoxon p "
        "cannot go below 2^(1−n): 0.25 for 3 subjects, 0.002 for 10 (evaluation/paired.py)."
    )


def probe_text(ref: str, pairs: str) -> str:
    """How to read the probe's paired rows; `pairs` says what was paired."""
    unit = (
        "Each probe slice's l1 is averaged over its draws (every band of t) and over the "
        "model's seeds, and the slices are paired across the two models (the draws are "
        "shared; several folds are put side by side). The interval and p take the probe's "
        "slices, from a few healthy validation volumes, as the units: they say whether the "
        "difference is resolved on these slices, not over a population of volumes."
        if pairs == "probe slices"
        else "These probe.json files keep only each run's mean (no per-draw values): the "
        "pairs are the (fold, seed) runs both models have, each run's overall l1."
    )
    return (
        f"Patch probe: each variant's in-patch l1 (x 100, image intensity units) minus "
        f"{ref}'s at the same draws; negative: the variant inpaints better. {unit} A difference "
        "is resolved when its 95 % bootstrap interval excludes 0 and the Wilcoxon p < 0.05."
    )


# ------------------------------------------------------------------ tables


def _mean_sd(v: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    return mean_std_text(np.asarray(v, dtype=float) * scale, digits)


def probe_markdown(rows: Sequence[tuple[str, dict, bool]], reference: dict | None) -> str:
    """The patch probe table: rows (label, (fold, seed) -> probe.json, is the U-Net
    reference) and the reference's probes (or None); '' without rows."""
    if not rows:
        return ""
    bands = next(iter(rows[0][1].values()))["probe"]["bands"]
    head = ["model", "runs", "in-patch l1"] + [f"t {b['t'][0]}-{b['t'][1]}" for b in bands]
    head += ["Δ U-Net", "MAE input share", "MAE / f"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs, is_reference in rows:
        cells = [label, str(len(runs))]
        cells.append(_mean_sd([p["probe"]["l1"] for p in runs.values()], 100))
        for b in range(len(bands)):
            cells.append(_mean_sd([p["probe"]["bands"][b]["l1"] for p in runs.values()], 100))
        diffs = []
        if reference is not None and not is_reference:
            diffs = [
                p["probe"]["l1"] - reference[key]["probe"]["l1"]
                for key, p in runs.items()
                if key in reference
            ]
        cells.append(f"{_mean_sd(diffs, 100, 3)} (n={len(diffs)})" if diffs else "-")
        mae = [p["mae"] for p in runs.values() if "mae" in p]
        cells.append(_mean_sd([d["input_share"] for d in mae], 1, 3) if mae else "-")
        cells.append(_mean_sd([d["relative_rms"] for d in mae], 1, 3) if mae else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_markdown(rows: Sequence[tuple[str, str]]) -> str:
    """| model | training budget | from (label, budget text) rows."""
    lines = ["| model | training budget |", "|---|---|"]
    lines += [f"| {label} | {budget} |" for label, budget in rows]
    return "\n".join(lines) + "\n"


__all__ = [
    "BUDGET_TEXT",
    "FIGURE3_TEXT",
    "FIGURE_PARTS",
    "LESION_TEXT",
    "PROBE_TEXT",
    "TABLE_TEXT",
    "budget_markdown",
    "figure3",
    "figure_key",
    "probe_markdown",
    "probe_text",
    "read_figure_slices",
    "split_figure_key",
    "subject_text",
    "timing_text",
]
