"""Collecting a benchmark: the tables, paired statistics and Figure 3 from whatever
runs have finished (`maediff benchmark --collect`, and the end of every call).

    OUT/table.md, table.csv       mean ± sd (sample sd) over runs, best bold, second underlined
    OUT/paired.md, paired.csv     each model's paired difference to the reference
                                  (MAEDiff; Table 2: the U-Net), with its 95 % interval
    OUT/probe.md, lesions.md, labelfree.md
    OUT/figure3.png               the same slices for every model
    OUT/report.html               all of it on one page

OUT/tables.json records the models those were written for: collecting another selection
(Table 2 beside Table 1, sharing its twin runs) writes the same files into
OUT/table2/ (or OUT/models-A+B/) and leaves Table 1's in place. What is computed here
(per-subject means, paired differences, probe pairs, lesion summaries over runs) is
written by reporting/ (reporting/benchmark.py, comparison.py, tables.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..evaluation.lesions import merge_runs
from ..evaluation.paired import PairedRow, paired_difference, paired_rows
from ..names import ANOMALY_SETS
from ..reporting.benchmark import (
    BUDGET_TEXT,
    FIGURE3_TEXT,
    LESION_TEXT,
    PROBE_TEXT,
    TABLE_TEXT,
    budget_markdown,
    figure3,
    probe_markdown,
    probe_text,
    subject_text,
    timing_text,
)
from ..reporting.comparison import (
    comparison_table,
    paired_csv,
    paired_markdown,
    resolved_sentence,
)
from ..reporting.files import read_subject_csv, write_atomic
from ..reporting.report import write_html
from ..reporting.runs import FREE_TEXT, labelfree_tables, load_summary
from ..reporting.summary import EvaluationSummary
from ..reporting.tables import lesion_markdown
from .plan import BenchmarkPlan, RunSpec, budget_of, row
from .status import is_done, twin_of, twin_run

Say = Callable[[str], None]


def finished_runs(
    plan: BenchmarkPlan, out: Path
) -> dict[str, list[tuple[RunSpec, EvaluationSummary]]]:
    """model -> its finished runs; a row with no run of its own takes those of its
    twin row (same configuration, `twin_of`), in either direction."""
    found: dict[str, list[tuple[RunSpec, EvaluationSummary]]] = {}
    for spec in plan.runs():
        src = spec if is_done(out / "runs" / spec.key) else twin_run(plan, spec, out)
        if src is not None:
            found.setdefault(spec.model, []).append(
                (src, load_summary(out / "runs" / src.key / "eval"))
            )
    return found


def per_subject_means(
    out: Path, runs: list[tuple[RunSpec, EvaluationSummary]]
) -> dict[str, dict[str, float]]:
    """'DATASET/metric' -> subject -> value averaged over the model's runs."""
    acc: dict[str, dict[str, list[float]]] = {}
    for spec, _ in runs:
        for ds in ANOMALY_SETS:
            f = out / "runs" / spec.key / "eval" / f"{ds}_test_subjects.csv"
            if not f.exists():
                continue
            for subject, values in read_subject_csv(f, ("dice", "auprc")):
                for metric, v in values.items():
                    acc.setdefault(f"{ds}/{metric}", {}).setdefault(subject, []).append(v)
    return {
        k: {s: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for s, v in d.items()}
        for k, d in acc.items()
    }


def selection_label(plan: BenchmarkPlan) -> str:
    """The name of a selection's own results folder: table1, table2 or the models."""
    return f"table{plan.table}" if plan.table else "models-" + "+".join(plan.models)


def tables_dir(plan: BenchmarkPlan, out: Path, say: Say = print) -> Path:
    """Where this selection's tables and page go. OUT/tables.json records which models
    the tables in OUT were written for; a selection of other models (Table 2 collected
    beside Table 1, whose twin runs it shares) writes into OUT/<label>/ instead of
    replacing them. Collecting the same models again updates them in place."""
    index = out / "tables.json"
    mine = sorted(plan.models)
    if index.exists():
        try:
            saved = json.loads(index.read_text())["models"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a benchmark tables index ({e}); move it away") from e
        if sorted(saved) == mine:
            return out
        dest = out / selection_label(plan)
        say(
            f"the tables in {out} are those of {', '.join(row(m) for m in saved)}: "
            f"these ({', '.join(row(m) for m in plan.models)}) go to {dest}"
        )
        dest.mkdir(exist_ok=True)
        return dest
    legacy = out / "table.md"  # written before the index existed (0.9.0): its rows say
    if legacy.exists():
        rows = {line.split("|")[1].strip() for line in legacy.read_text().splitlines()[2:]}
        if not rows <= {row(m) for m in plan.models}:
            dest = out / selection_label(plan)
            say(f"the tables in {out} are those of {', '.join(sorted(rows))}: these go to {dest}")
            dest.mkdir(exist_ok=True)
            return dest
    write_atomic(index, json.dumps({"models": plan.models}, indent=2))
    return out


def collect(plan: BenchmarkPlan, out: Path, say: Say = print) -> int:
    """The tables, figure and page of the finished runs (module docstring)."""
    found = finished_runs(plan, out)
    rows = {row(m): [s for _, s in found[m]] for m in plan.models if m in found}
    if not rows:
        say("no finished runs yet")
        return 0
    dest = tables_dir(plan, out, say)
    table = comparison_table(rows)
    write_atomic(dest / "table.md", table.markdown())
    write_atomic(dest / "table.csv", table.csv())
    paired = paired_report(plan, out, found)
    if paired:
        write_atomic(dest / "paired.md", paired["markdown"])
        write_atomic(dest / "paired.csv", paired_csv(paired["rows"] + paired["probe_rows"]))
    figure_runs = [
        (row(m), out / "runs" / found[m][0][0].key / "figure3.npz")
        for m in plan.models
        if m in found
    ]
    fig = figure3(figure_runs, dest / "figure3.png", say)
    probe_md = probe_table(plan, out, found)
    lesion_md = lesion_markdown(lesion_summaries(plan, found))
    free_runs = [(m, spec, s) for m in plan.models for spec, s in found.get(m, [])]
    free_md = labelfree_tables(
        [s for _, _, s in free_runs],  # named by the table's row (a twin's run too)
        [f"{row(m)} fold{spec.fold}-seed{spec.seed}" for m, spec, _ in free_runs],
    )
    for name, md in (("probe.md", probe_md), ("lesions.md", lesion_md), ("labelfree.md", free_md)):
        if md:
            write_atomic(dest / name, md)
    budget_md = budget_markdown(
        [(row(m), budget_of(plan.config(run_of(plan, m, found)))) for m in plan.models]
    )
    text = f"{TABLE_TEXT} Budget: {plan.budget()}; scale {plan.scale}. {timing_text(total_seconds(out, found))}"
    # the comparison with its uncertainty next to the table it qualifies, the long
    # per-run tables last
    sections = [{"heading": "Table", "table": table.markdown(), "text": text}]
    sections += paired["sections"] if paired else []
    if probe_md:
        sections.append({"heading": "Patch probe", "table": probe_md, "text": PROBE_TEXT})
    if fig:
        sections.append({"heading": "Figure 3", "text": FIGURE3_TEXT, "images": [fig]})
    sections.append({"heading": "Training budgets", "table": budget_md, "text": BUDGET_TEXT})
    if lesion_md:
        sections.append({"heading": "Results by lesion", "table": lesion_md, "text": LESION_TEXT})
    if free_md:
        sections.append({"heading": "Without lesion labels", "table": free_md, "text": FREE_TEXT})
    page = write_html(dest / "report.html", "maediff benchmark", sections)
    for md in (table.markdown(), budget_md, probe_md, paired["markdown"] if paired else ""):
        if md:
            say(md)
    say(f"report: {page}")
    return 0


def run_of(plan: BenchmarkPlan, model: str, found) -> RunSpec:
    """The model's first finished run, or the plan's first run of it."""
    return found[model][0][0] if model in found else RunSpec(model, plan.folds[0], plan.seeds[0])


def total_seconds(out: Path, found) -> float:
    """Training and evaluation seconds of the finished runs (timing.json), added up."""
    total = 0.0
    for runs in found.values():
        for spec, _ in runs:
            f = out / "runs" / spec.key / "timing.json"
            if f.exists():
                t = json.loads(f.read_text())
                total += t.get("train_s", 0) + t.get("evaluate_s", 0)
    return total


def lesion_summaries(plan: BenchmarkPlan, found) -> dict[str, dict[str, dict]]:
    """row -> data set -> the lesion summary of the model's runs merged (evaluation/lesions.py)."""
    by_model: dict[str, dict[str, dict]] = {}
    for m in plan.models:
        per_ds: dict[str, list[dict]] = {}
        for _, s in found.get(m, []):
            for ds, d in s.datasets.items():
                if d.lesions is not None:
                    per_ds.setdefault(ds, []).append(d.lesions.to_json())
        if per_ds:
            by_model[row(m)] = {ds: merge_runs(v) for ds, v in per_ds.items()}
    return by_model


# ------------------------------------------------------------------ paired differences

# the plain U-Net, whichever of its two names ran (the same configuration)
PROBE_REFERENCE = ("ablation-unet", twin_of("ablation-unet"))


def paired_reference(plan: BenchmarkPlan, found) -> str | None:
    """The row the paired table compares every other with: in Table 2 the plain U-Net
    (whichever of its two names ran: the ablation asks what each addition changes),
    otherwise the table's marked reference (MAEDiff); None without finished runs of it."""
    if plan.table == "2":
        return next((m for m in PROBE_REFERENCE if m in found), None)
    ref = plan.reference()
    return ref if ref in found else None


def paired_report(plan: BenchmarkPlan, out: Path, found) -> dict | None:
    """The paired differences of every model to the reference over test subjects and,
    for the diffusion models, of the patch probe to the U-Net: the rows (subjects,
    probe), paired.md and the report's sections; None when nothing can be paired."""
    ref = paired_reference(plan, found)
    rows: list[PairedRow] = []
    if ref is not None:
        per_subject = {row(m): per_subject_means(out, found[m]) for m in plan.models if m in found}
        rows = paired_rows(per_subject, row(ref))
    probe_rows = probe_paired_rows(plan, out, found)
    if not rows and not probe_rows:
        return None
    md, sections = [], []
    if rows:
        text, table = (
            f"{subject_text(row(ref))}\n\n{resolved_sentence(rows)}",
            paired_markdown(rows),
        )
        md.append(f"## Paired differences against {row(ref)}\n\n{text}\n\n{table}")
        sections.append(
            {"heading": f"Paired differences against {row(ref)}", "text": text, "table": table}
        )
    if probe_rows:
        ref_p = probe_rows[0].reference
        text = f"{probe_text(ref_p, probe_rows[0].pairs)}\n\n{resolved_sentence(probe_rows)}"
        table = paired_markdown(probe_rows, unit="l1 x 100")
        md.append(f"## Patch probe against {ref_p}\n\n{text}\n\n{table}")
        sections.append({"heading": f"Patch probe against {ref_p}", "text": text, "table": table})
    return {"rows": rows, "probe_rows": probe_rows, "markdown": "\n".join(md), "sections": sections}


def probe_units(p: dict) -> np.ndarray | None:
    """One run's probe per slice: each slice's in-patch l1 averaged over its draws (the
    per_draw rows are band-major, slice-minor: row i is slice i mod n_slices); None for
    a probe.json without per-draw values."""
    v, n = p["probe"].get("per_draw"), p["probe"].get("n_slices")
    if v is None or not n or len(v) % n:
        return None
    return np.asarray(v, dtype=np.float64).reshape(-1, n).mean(axis=0)


def probe_draws(p: dict) -> tuple:
    """What makes two runs' probe draws the same ones (benchmark/probe.py)."""
    pr = p["probe"]
    return (pr.get("seed"), pr.get("n_draws"), pr.get("n_slices"), [b["t"] for b in pr["bands"]])


def _probes(out: Path, found) -> dict[str, dict[tuple[int, int], dict]]:
    """model -> (fold, seed) -> probe.json of every finished run that has one."""
    probes = {
        m: {(spec.fold, spec.seed): p for spec, _ in runs if (p := _probe(out, spec))}
        for m, runs in found.items()
    }
    return {m: v for m, v in probes.items() if v}


def probe_paired_rows(plan: BenchmarkPlan, out: Path, found) -> list[PairedRow]:
    """Each probed model's in-patch l1 against the plain U-Net's: over the probe's
    slices (averaged over draws and seeds, folds side by side) when every probe.json
    keeps its per-draw values, else over the (fold, seed) runs both have."""
    probes = _probes(out, found)
    ref_m = next((r for r in PROBE_REFERENCE if r in probes), None)
    if ref_m is None:
        return []
    ref = probes[ref_m]
    by_slice = all(probe_units(p) is not None for v in probes.values() for p in v.values())
    rows = []
    for m in plan.models:
        if m not in probes or m in PROBE_REFERENCE:
            continue
        if by_slice:
            a, b = _slices_paired(probes[m], ref)
        else:
            keys = sorted(set(probes[m]) & set(ref))
            a = np.array([probes[m][k]["probe"]["l1"] for k in keys])
            b = np.array([ref[k]["probe"]["l1"] for k in keys])
        if a.size:
            pairs = "probe slices" if by_slice else "runs"
            rows.append(
                PairedRow(row(m), row(ref_m), "probe", "l1", pairs, paired_difference(a, b))
            )
    return rows


def _slices_paired(
    runs: dict[tuple[int, int], dict], ref: dict[tuple[int, int], dict]
) -> tuple[np.ndarray, np.ndarray]:
    """Per fold both have (with the same draws): each slice's value averaged over the
    model's seeds, and the reference's; the folds' slices one after the other."""
    a, b = [], []
    for fold in sorted({f for f, _ in runs} & {f for f, _ in ref}):
        mine = [p for (f, _), p in runs.items() if f == fold]
        theirs = [p for (f, _), p in ref.items() if f == fold]
        if len({repr(probe_draws(p)) for p in mine + theirs}) != 1:
            continue  # other draws (another geometry or probe version): not paired
        a.append(np.mean([probe_units(p) for p in mine], axis=0))
        b.append(np.mean([probe_units(p) for p in theirs], axis=0))
    return (np.concatenate(a), np.concatenate(b)) if a else (np.zeros(0), np.zeros(0))


def _probe(out: Path, spec: RunSpec) -> dict | None:
    f = out / "runs" / spec.key / "probe.json"
    return json.loads(f.read_text()) if f.exists() else None


def probe_table(plan: BenchmarkPlan, out: Path, found) -> str:
    """The patch probe of every model with probed finished runs (Markdown, '' if none)."""
    probes = _probes(out, found)
    ref = next((probes[r] for r in PROBE_REFERENCE if r in probes), None)
    rows = [(row(m), probes[m], m in PROBE_REFERENCE) for m in plan.models if m in probes]
    return probe_markdown(rows, ref)


__all__ = ["collect", "finished_runs", "paired_report", "probe_draws", "probe_units", "tables_dir"]
