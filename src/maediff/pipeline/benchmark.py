"""`maediff benchmark`: the paper's Tables 1 and 2 and Figure 3 as one resumable job.

    plan = BenchmarkPlan.from_args(table="1", scale="cpu", seeds=[0, 1, 2], minutes=3)
    run_benchmark(plan, Path("bench"))

Every (model, fold, seed) is one run in its own folder, OUT/runs/MODEL/fold{F}-seed{S}/:
config.yaml (the resolved configuration; a different one for an existing folder is
refused), train/ (the training run, resumed from its last checkpoint after an
interruption), eval/ (the paper's protocol), probe.json (diffusion models: the patch
probe), figure3.npz (the slices of Figure 3), timing.json and status.json, whose "done",
written after everything else, marks a finished run. Starting the command again skips
finished runs and resumes an interrupted one at its first missing step. Runs are
independent: `--list` prints one command per run with its estimated time
(pipeline/estimate.py), and `--run-index N` does run N alone (a job array fills one
folder from many GPUs; a per-run lock keeps two processes off the same run; give each
process its own GPU with CUDA_VISIBLE_DEVICES, or --device cuda:I; a process with
LOCAL_RANK set takes cuda:LOCAL_RANK; not under torchrun, whose ranks would join one
process group for different runs); a final call (or `--collect`) writes the tables from
whatever has finished:

    OUT/table.md, table.csv       mean ± std over runs, best bold, second underlined
    OUT/paired.md, paired.csv     each model's paired difference to the reference
                                  (MAEDiff; Table 2: the U-Net), with its 95 % interval
    OUT/figure3.png               the same slices for every model
    OUT/report.html               all of it on one page

OUT/tables.json records the models those were written for: collecting another selection
(Table 2 beside Table 1, sharing its twin runs) writes the same files into
OUT/table2/ (or OUT/models-A+B/) and leaves Table 1's in place.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import (
    Config,
    apply_overrides,
    get_preset,
    load_config,
    save_config,
    to_dict,
)
from ..data.datasets import load_subject
from ..data.splits import read_pddpm_split
from ..data.synthetic import SynthConfig, generate_benchmark
from ..device import reset_compiled, resolve_device
from ..evaluation.lesions import merge_runs
from ..evaluation.paired import paired_difference
from ..models import MODELS
from ..names import ANOMALY_SETS, FIGURE_SUBJECTS
from ..outputs import check_own_folder, clean_stale, temp_path
from ..registry import model_names, preset_info, preset_name, presets_of_table
from ..reporting.comparison import (
    PairedRow,
    comparison_table,
    figure_comparison,
    paired_csv,
    paired_markdown,
    paired_rows,
    resolved_sentence,
)
from ..reporting.files import read_subject_csv, write_atomic
from ..reporting.report import write_html
from ..reporting.runs import FREE_TEXT, labelfree_tables, load_summary
from ..reporting.summary import SUMMARY_FILE, EvaluationSummary
from ..reporting.tables import lesion_markdown, mean_std_text
from ..scales import with_update_budget
from ..training.checkpoint import load_model
from ..training.data import prepare_training_data
from ..training.trainer import train
from .detect import reconstruct_volume
from .evaluate import evaluate_model
from .probe import mae_input_dependence, patch_probe, probe_slices
from .status import is_done, mark_status, twin_of, twin_run


def row(model: str) -> str:
    """The table row of a preset model name (its declaration's `row`)."""
    return preset_info(model).row


def reference_of(table: str | None) -> str:
    """The row the paired tests compare against: the preset its model module marks as
    the reference of that table; for --models, the reference of Table 1 (MAEDiff)."""
    marked = [m for m in presets_of_table(table or "1") if preset_info(m).reference]
    return marked[0] if marked else Config().model


@dataclass(frozen=True)
class RunSpec:
    model: str  # preset base name, a row of Table 1 or 2
    fold: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}/fold{self.fold}-seed{self.seed}"


@dataclass
class BenchmarkPlan:
    models: list[str]
    scale: str = "cpu"
    folds: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    data: str | None = None
    minutes: float | None = None
    steps: int | None = None
    max_volumes: int | None = None
    overrides: list[str] = field(default_factory=list)
    table: str | None = None

    @classmethod
    def from_args(
        cls,
        table: str | None = None,
        models: Sequence[str] | None = None,
        scale: str = "cpu",
        folds: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
        data: str | Path | None = None,
        minutes: float | None = None,
        steps: int | None = None,
        max_volumes: int | None = None,
        overrides: Sequence[str] = (),
    ) -> BenchmarkPlan:
        if bool(table) == bool(models):
            raise ValueError("give --table 1, --table 2 or --models NAME ..., one of them")
        names = list(presets_of_table(table) if table else models)
        known = model_names()
        unknown = [m for m in names if m not in known]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {list(known)}")
        if minutes is not None and steps is not None:
            raise ValueError("give one training budget: --minutes or --steps")
        if minutes is not None and not 0 < minutes < math.inf:
            raise ValueError(f"--minutes {minutes} must be a number of minutes > 0")
        if steps is not None and steps < 1:
            raise ValueError(f"--steps {steps} must be >= 1")
        if max_volumes is not None and max_volumes < 1:
            raise ValueError(f"--max-volumes {max_volumes} must be >= 1 (or left out for all)")
        for f in folds or []:
            if not 0 <= f <= 4:
                raise ValueError(f"fold {f} must be in 0..4")
        plan = cls(
            models=names,
            scale=scale,
            folds=list(folds or [0]),
            seeds=list(seeds or [0]),
            data=str(data) if data else None,
            minutes=minutes,
            steps=steps,
            max_volumes=max_volumes,
            overrides=list(overrides),
            table=table,
        )
        for spec in plan.runs():  # every configuration is valid before anything runs
            plan.config(spec)
        return plan

    def runs(self) -> list[RunSpec]:
        return [RunSpec(m, f, s) for m in self.models for f in self.folds for s in self.seeds]

    def config(self, spec: RunSpec) -> Config:
        """The preset at this scale, the budget shared by every model, the fold and seed."""
        cfg = get_preset(preset_name(spec.model, self.scale))
        t = cfg.train
        if self.minutes is not None:
            t = replace(t, max_minutes=self.minutes, max_steps=0, epochs=10**6)
        cfg = replace(cfg, train=t)
        if self.minutes is None and self.steps is not None:
            cfg = with_update_budget(cfg, self.steps)
        cfg = replace(
            cfg, train=replace(cfg.train, seed=spec.seed), data=replace(cfg.data, fold=spec.fold)
        )
        return apply_overrides(cfg, self.overrides) if self.overrides else cfg

    def budget(self) -> str:
        if self.minutes is not None:
            return f"{self.minutes:g} min of training per run"
        if self.steps is not None:
            return f"{self.steps} updates of each reconstructing part per run"
        return "each preset's own training budget"

    def reference(self) -> str | None:
        ref = reference_of(self.table)
        return ref if ref in self.models else None

    def command(self, out: Path, device: str, index: int | None = None) -> str:
        parts = ["maediff", "benchmark", "-o", str(out), "--scale", self.scale, "--device", device]
        parts += ["--table", self.table] if self.table else ["--models", *self.models]
        parts += ["--folds", *map(str, self.folds), "--seeds", *map(str, self.seeds)]
        for flag, v in (
            ("--data", self.data),
            ("--minutes", self.minutes),
            ("--steps", self.steps),
            ("--max-volumes", self.max_volumes),
        ):
            if v is not None:
                parts += [flag, str(v)]
        for o in self.overrides:
            parts += ["--set", o]
        if index is not None:
            parts += ["--run-index", str(index)]
        return shlex.join(parts)


# ------------------------------------------------------------------ one run


@contextmanager
def file_lock(path: Path, wait: bool = False) -> Iterator[bool]:
    """An exclusive lock on `path` (released by the OS if the process dies); yields
    whether it is held (always, with `wait`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_lock(folder: Path) -> AbstractContextManager[bool]:
    """An exclusive lock on a run folder, not waited for: yields False when another
    process holds it."""
    return file_lock(folder / ".lock")


def check_run_config(folder: Path, cfg: Config) -> None:
    saved = folder / "config.yaml"
    if saved.exists():
        if to_dict(load_config(saved)) != to_dict(cfg):
            raise ValueError(
                f"{folder} was started with a different configuration ({saved}); "
                "use another output folder, or delete that run to start it again"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)


def execute_run(
    plan: BenchmarkPlan, spec: RunSpec, out: Path, data: Path, device: str, progress: bool
) -> dict:
    """Train (or resume), evaluate and record one run; returns its timings. Each step
    whose result exists is skipped (a run interrupted after its evaluation computes
    only what is missing); status.json says "done" last of all."""
    folder = out / "runs" / spec.key
    cfg = plan.config(spec)
    check_run_config(folder, cfg)
    mark_status(folder)  # running: not finished until marked done again
    for f in (folder, folder / "train"):  # temporary files of a killed process
        clean_stale(f)
    timing: dict[str, Any] = {}
    earlier = folder / "timing.json"  # a run trained (or evaluated) before: its times stay
    if earlier.exists():
        timing.update(json.loads(earlier.read_text()))
    files = ["config.yaml", f"eval/{SUMMARY_FILE}", "timing.json"]
    t0 = time.perf_counter()
    trained = False
    if MODELS[cfg.model].trainable:
        run_dir = folder / "train"
        if not (run_dir / "train_summary.json").exists():
            trained = True
            # a killed run resumes; train() refuses one of another configuration once
            # the data's landmarks, which its config.yaml holds, are filled in
            resume = (run_dir / "last.state.safetensors").exists()
            td = training_data(cfg, data, progress)
            summary = train(cfg, td, run_dir, device=device, resume=resume, progress=progress)
            timing["train_steps"] = summary["steps"]
            reset_compiled()  # the training model's graphs: not the evaluated model's
        model = load_model(run_dir, resolve_device(device))
        files.append("train/train_summary.json")
    else:
        from ..models import build_model

        model = build_model(cfg).to(resolve_device(device))
    if trained or "train_s" not in timing:
        timing["train_s"] = round(time.perf_counter() - t0, 1)
    if model.patch_probe:  # the models that declare it (pipeline/probe.py)
        if not (folder / "probe.json").exists():
            t0 = time.perf_counter()
            write_probe(model, data, folder / "probe.json")
            timing["probe_s"] = round(time.perf_counter() - t0, 1)
        files.append("probe.json")
    if not (folder / "eval" / SUMMARY_FILE).exists():
        t0 = time.perf_counter()
        evaluate_model(
            model,
            data,
            folder / "eval",
            label=row(spec.model),
            fold=spec.fold,
            n_jobs=1,
            seed=spec.seed,
            max_volumes=plan.max_volumes,
            progress=progress,
            overwrite=True,  # the run's own folder: an evaluation without its summary is redone
        )
        timing["evaluate_s"] = round(time.perf_counter() - t0, 1)
    elif "evaluate_s" not in timing:  # evaluated before an interruption: its own clock
        timing["evaluate_s"] = load_summary(folder / "eval").seconds
    if (spec.fold, spec.seed) == (plan.folds[0], plan.seeds[0]):  # Figure 3 shows one run
        if not (folder / "figure3.npz").exists():
            save_figure_slices(model, data, folder / "figure3.npz", spec.seed)
        files.append("figure3.npz")
    write_atomic(folder / "timing.json", json.dumps(timing, indent=2))
    mark_status(folder, files)
    return timing


def write_probe(model, data: Path, path: Path) -> None:
    """The patch probe and, with a branch (the MAE), its input dependence (pipeline/probe.py)."""
    slices, brain = probe_slices(model.cfg, data)
    result = {"probe": patch_probe(model, slices, brain)}
    dep = mae_input_dependence(model, slices)
    if dep is not None:
        result["mae"] = dep
    write_atomic(path, json.dumps(result, indent=1))


_DATA_CACHE: dict[str, Any] = {}


def training_data(cfg: Config, data: Path, progress: bool):
    """Training volumes, loaded once per process for every run with the same data
    settings, fold and slice size (loading dominates short runs)."""
    key = json.dumps([str(data), to_dict(cfg)["data"], cfg.geometry.image_size])
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = prepare_training_data(cfg, data, progress=progress)
    return _DATA_CACHE[key]


def figure_subjects(data: Path) -> list:
    out = []
    for ds, n in FIGURE_SUBJECTS:
        out += read_pddpm_split(data, ds, "test")[:n]
    return out


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


@torch.no_grad()
def save_figure_slices(model, data: Path, path: Path, seed: int) -> None:
    """For Figure 3: the axial slice with the most lesion voxels of a few test volumes."""
    arrays = {}
    for i, s in enumerate(figure_subjects(data)):
        vol = load_subject(s, model.cfg.data)
        rec = reconstruct_volume(
            model, vol, torch.Generator().manual_seed(seed), skip_empty_patches=False
        )
        z = (
            int(np.argmax(vol.segmentation.sum(axis=(0, 1))))
            if vol.segmentation is not None
            else vol.image.shape[2] // 2
        )
        arrays[figure_key(i, s.name, "image")] = vol.image[..., z]
        arrays[figure_key(i, s.name, "segmentation")] = (
            vol.segmentation[..., z]
            if vol.segmentation is not None
            else np.zeros_like(vol.image[..., z])
        )
        arrays[figure_key(i, s.name, "reconstruction")] = rec[..., z]
        arrays[figure_key(i, s.name, "brain")] = vol.brain_mask[..., z].astype(np.float32)
    tmp = temp_path(path, ".npz")
    try:
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ the whole job


def check_data(plan: BenchmarkPlan) -> None:
    """--data, when given, is in pDDPM's layout."""
    if plan.data and not (Path(plan.data) / "splits").is_dir():
        raise ValueError(f"--data {plan.data} is not in pDDPM's layout (no splits/ folder)")


def ensure_data(plan: BenchmarkPlan, out: Path, progress: bool) -> Path:
    """--data, or the synthetic benchmark in OUT/data, generated once: processes that
    start together wait for the first one's (a lock), and find it complete."""
    if plan.data:
        check_data(plan)
        return Path(plan.data)
    data = out / "data"
    with file_lock(out / ".data.lock", wait=True):
        if not (data / "synthetic.json").exists():
            if data.exists() and any(data.iterdir()):
                raise ValueError(
                    f"{data} exists but holds no synthetic benchmark (no synthetic.json); "
                    "move it away, or give --data"
                )
            generate_benchmark(data, SynthConfig(), overwrite=True, progress=progress)
    return data


def check_plan(plan: BenchmarkPlan, out: Path) -> None:
    """The budget and data of an existing benchmark folder cannot change under it."""
    path = out / "benchmark.json"
    mine = {
        k: v
        for k, v in asdict(plan).items()
        if k in ("scale", "data", "minutes", "steps", "max_volumes", "overrides")
    }
    if path.exists():
        saved = json.loads(path.read_text()).get("shared", {})
        if saved != mine:
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            raise ValueError(
                f"{out} holds a benchmark with other shared settings (saved, given): {diff}; "
                "use another output folder"
            )
    else:
        write_atomic(path, json.dumps({"shared": mine}, indent=2))


def process_device(device: str) -> str:
    """The device this benchmark process trains and evaluates on. With LOCAL_RANK set
    (several processes started on one machine), "auto" and "cuda" take cuda:LOCAL_RANK
    instead of all taking GPU 0; an explicit "cuda:I" is kept. Under torchrun
    (WORLD_SIZE > 1) it refuses: every rank would join one process group, and their
    runs are different ones."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(
            f"benchmark does not run under torchrun (WORLD_SIZE={world}): each run trains "
            "in one process, and torchrun's ranks would join one process group for "
            "different runs. Start one process per GPU instead, each with --run-index N "
            "and its own GPU (CUDA_VISIBLE_DEVICES=I or --device cuda:I)"
        )
    local = os.environ.get("LOCAL_RANK")
    if local is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(local)}"
    return device


BENCHMARK_MARKS = ("benchmark.json", "estimates.json")  # a folder benchmark made


def run_benchmark(
    plan: BenchmarkPlan,
    out: Path,
    device: str = "auto",
    list_runs: bool = False,
    run_index: Sequence[int] | int | None = None,
    collect_only: bool = False,
    progress: bool = True,
    estimate: bool = True,
) -> int:
    """Every run of the plan (or those of `run_index`), then the tables; `list_runs`
    only prints the jobs with their time estimates (measured unless `estimate` is
    False: pipeline/estimate.py)."""
    check_own_folder(out, "benchmark", marks=BENCHMARK_MARKS)  # the output rule (outputs.py)
    runs = plan.runs()
    if list_runs:
        list_jobs(plan, out, device, estimate)
        return 0
    indices = [run_index] if isinstance(run_index, int) else list(run_index or range(len(runs)))
    bad = [i for i in indices if not 0 <= i < len(runs)]
    if bad:
        raise ValueError(f"--run-index {bad} must be in 0..{len(runs) - 1}")
    if not collect_only:  # everything a run needs is checked before the folder is claimed
        device = process_device(device)
        resolve_device(device)
        check_data(plan)
    out.mkdir(parents=True, exist_ok=True)
    check_plan(plan, out)
    if not collect_only:
        data = ensure_data(plan, out, progress)
        todo = [runs[i] for i in indices]
        _run_all(plan, todo, out, data, device, progress)
    return collect(plan, out)


def list_jobs(plan: BenchmarkPlan, out: Path, device: str, measure: bool = True) -> None:
    """One command per run, each with what it does and its estimated time, and the
    totals for one process and for two (pipeline/estimate.py)."""
    from .estimate import estimate_jobs, job_line, summary_lines

    check_data(plan)  # the estimate reads its splits
    jobs = estimate_jobs(plan, out, device, measure)
    for line in summary_lines(jobs, device, measure):
        print(line)
    for i, (spec, job) in enumerate(zip(plan.runs(), jobs)):
        served = f" (as {job.served_by}, the same configuration)" if job.served_by else ""
        print(f"# {i}: {spec.key}: {job_line(job)}{served}\n{plan.command(out, device, i)}")
    print(f"# then collect: {plan.command(out, device)} --collect")


def _run_all(plan, todo: list[RunSpec], out: Path, data: Path, device: str, progress: bool) -> None:
    print(f"benchmark: {len(todo)} run(s), {plan.budget()}, scale {plan.scale} -> {out}")
    spent: list[float] = []
    for i, spec in enumerate(todo, 1):
        folder = out / "runs" / spec.key
        if is_done(folder):
            print(f"[{i}/{len(todo)}] {spec.key}: done")
            continue
        if (twin := twin_run(plan, spec, out)) is not None:
            print(f"[{i}/{len(todo)}] {spec.key}: done as {twin.key} (the same configuration)")
            continue
        with run_lock(folder) as mine:
            if not mine:
                print(f"[{i}/{len(todo)}] {spec.key}: running in another process, skipped")
                continue
            if is_done(folder):  # finished by another process since the first look
                print(f"[{i}/{len(todo)}] {spec.key}: done")
                continue
            left = len(todo) - i + 1
            eta = f", about {np.mean(spent) * left / 60:.0f} min left" if spent else ""
            print(f"[{i}/{len(todo)}] {spec.key}: training and evaluating{eta}", flush=True)
            t0 = time.perf_counter()
            reset_compiled()  # each run compiles its own model, within the recompile limit
            timing = execute_run(plan, spec, out, data, device, progress)
            spent.append(time.perf_counter() - t0)
            print(
                f"[{i}/{len(todo)}] {spec.key}: finished in {spent[-1] / 60:.1f} min {timing}",
                flush=True,
            )


# ------------------------------------------------------------------ tables and figure


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


def tables_dir(plan: BenchmarkPlan, out: Path) -> Path:
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
        print(
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
            print(f"the tables in {out} are those of {', '.join(sorted(rows))}: these go to {dest}")
            dest.mkdir(exist_ok=True)
            return dest
    write_atomic(index, json.dumps({"models": plan.models}, indent=2))
    return out


def collect(plan: BenchmarkPlan, out: Path) -> int:
    found = finished_runs(plan, out)
    rows = {row(m): [s for _, s in found[m]] for m in plan.models if m in found}
    if not rows:
        print("no finished runs yet")
        return 0
    dest = tables_dir(plan, out)
    table = comparison_table(rows)
    write_atomic(dest / "table.md", table.markdown())
    write_atomic(dest / "table.csv", table.csv())
    paired = paired_report(plan, out, found)
    if paired:
        write_atomic(dest / "paired.md", paired["markdown"])
        write_atomic(dest / "paired.csv", paired_csv(paired["rows"] + paired["probe_rows"]))
    fig = _figure3(plan, out, found, dest)
    timing = _timing_text(plan, out, found)
    probe_md = probe_table(plan, out, found)
    if probe_md:
        write_atomic(dest / "probe.md", probe_md)
    budget_md = budget_table(plan, found)
    lesion_md = lesion_table(plan, found)
    if lesion_md:
        write_atomic(dest / "lesions.md", lesion_md)
    free_runs = [(m, spec, s) for m in plan.models for spec, s in found.get(m, [])]
    free_md = labelfree_tables(
        [s for _, _, s in free_runs],  # named by the table's row (a twin's run too)
        [f"{row(m)} fold{spec.fold}-seed{spec.seed}" for m, spec, _ in free_runs],
    )
    if free_md:
        write_atomic(dest / "labelfree.md", free_md)
    sections = [
        {
            "heading": "Table",
            "table": table.markdown(),
            "text": f"Mean ± std over runs (folds or seeds) of each run's per-volume mean; best bold, second underlined. Budget: {plan.budget()}; scale {plan.scale}. {timing}",
        },
    ]
    # the comparison with its uncertainty next to the table it qualifies, the long
    # per-run tables last
    if paired:
        sections += paired["sections"]
    if probe_md:
        sections.append({"heading": "Patch probe", "table": probe_md, "text": PROBE_TEXT})
    if fig:
        sections.append(
            {
                "heading": "Figure 3",
                "text": "Per example: input and each model's reconstruction (top), ground truth and each model's anomaly map |x - reconstruction| inside the brain (bottom, each map from 0 to its own 99.5th percentile).",
                "images": [fig],
            }
        )
    sections.append(
        {
            "heading": "Training budgets",
            "table": budget_md,
            "text": "Every model gets the same number of optimizer updates of each part that produces its reconstruction (docs/baselines.md, Budgets).",
        }
    )
    if lesion_md:
        sections.append(
            {
                "heading": "Results by lesion",
                "table": lesion_md,
                "text": "Lesion-wise detection of each model's runs: counts summed over runs (sensitivity by lesion volume: detected / lesions), lesion F1, sensitivity and false-positive components per volume averaged over runs (docs/evaluation.md, Results by lesion).",
            }
        )
    if free_md:
        sections.append({"heading": "Without lesion labels", "table": free_md, "text": FREE_TEXT})
    page = write_html(dest / "report.html", "maediff benchmark", sections)
    print(table.markdown())
    print(budget_md)
    if probe_md:
        print(probe_md)
    if paired:
        print(paired["markdown"])
    print(f"report: {page}")
    return 0


# the plain U-Net, whichever of its two names ran (the same configuration)
PROBE_REFERENCE = ("ablation-unet", twin_of("ablation-unet"))
PROBE_TEXT = (
    "In-patch l1 (x 100, image intensity units) of each diffusion model's x0 prediction on "
    "healthy validation slices, at draws of (t, noise field, patch position) fixed once and "
    "shared by every model and run, overall and per band of t; mean ± std over runs. "
    "Δ U-Net: the paired difference to the plain U-Net run of the same fold and seed, mean ± "
    "std over those pairs (negative: better inpainting). MAE input share: the fraction of the "
    "MAE branch's output energy that depends on the image (the rest is the same for every "
    "input at a patch position); MAE / f: the branch's rms relative to the feature map it is "
    "added to (pipeline/probe.py)."
)


def paired_reference(plan: BenchmarkPlan, found) -> str | None:
    """The row the paired table compares every other with: in Table 2 the plain U-Net
    (whichever of its two names ran: the ablation asks what each addition changes),
    otherwise the table's marked reference (MAEDiff); None without finished runs of it."""
    if plan.table == "2":
        return next((m for m in PROBE_REFERENCE if m in found), None)
    ref = plan.reference()
    return ref if ref in found else None


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
    """What makes two runs' probe draws the same ones (pipeline/probe.py)."""
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


def _mean_std(v: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    return mean_std_text(np.asarray(v, dtype=float) * scale, digits)


def probe_table(plan: BenchmarkPlan, out: Path, found) -> str:
    """The patch probe of every diffusion model with finished runs (Markdown, '' if none)."""
    probes = _probes(out, found)
    if not probes:
        return ""
    ref = next((probes[r] for r in PROBE_REFERENCE if r in probes), None)
    bands = next(iter(next(iter(probes.values())).values()))["probe"]["bands"]
    head = ["model", "runs", "in-patch l1"] + [f"t {b['t'][0]}-{b['t'][1]}" for b in bands]
    head += ["Δ U-Net", "MAE input share", "MAE / f"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in plan.models:
        if m not in probes:
            continue
        runs = probes[m]
        cells = [row(m), str(len(runs))]
        cells.append(_mean_std([p["probe"]["l1"] for p in runs.values()], 100))
        for b in range(len(bands)):
            cells.append(_mean_std([p["probe"]["bands"][b]["l1"] for p in runs.values()], 100))
        if ref is not None and m not in PROBE_REFERENCE:
            diffs = [
                p["probe"]["l1"] - ref[key]["probe"]["l1"] for key, p in runs.items() if key in ref
            ]
            cells.append(f"{_mean_std(diffs, 100, 3)} (n={len(diffs)})" if diffs else "-")
        else:
            cells.append("-")
        mae = [p["mae"] for p in runs.values() if "mae" in p]
        cells.append(_mean_std([d["input_share"] for d in mae], 1, 3) if mae else "-")
        cells.append(_mean_std([d["relative_rms"] for d in mae], 1, 3) if mae else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lesion_table(plan: BenchmarkPlan, found) -> str:
    by_model: dict[str, dict[str, dict]] = {}
    for m in plan.models:
        per_ds: dict[str, list[dict]] = {}
        for _, s in found.get(m, []):
            for ds, d in s.datasets.items():
                if d.lesions is not None:
                    per_ds.setdefault(ds, []).append(d.lesions.to_json())
        if per_ds:
            by_model[row(m)] = {ds: merge_runs(v) for ds, v in per_ds.items()}
    return lesion_markdown(by_model)


def budget_of(cfg: Config) -> str:
    """The training budget of one configuration in the shared unit (updates per part)."""
    t = cfg.train
    if not MODELS[cfg.model].trainable:
        return "no training"
    if t.max_minutes:
        return f"{t.max_minutes:g} min"
    if not t.max_steps:
        return f"{t.epochs} epochs of batch {t.batch_size}"
    return MODELS[cfg.model].update_budget_text(cfg)


def budget_table(plan: BenchmarkPlan, found) -> str:
    lines = ["| model | training budget |", "|---|---|"]
    for m in plan.models:
        spec = found[m][0][0] if m in found else RunSpec(m, plan.folds[0], plan.seeds[0])
        lines.append(f"| {row(m)} | {budget_of(plan.config(spec))} |")
    return "\n".join(lines) + "\n"


def _figure3(plan: BenchmarkPlan, out: Path, found, dest: Path) -> Path | None:
    examples: dict[str, dict] = {}
    names = []
    for m in plan.models:
        if m not in found:
            continue
        spec = found[m][0][0]
        f = out / "runs" / spec.key / "figure3.npz"
        if not f.exists():
            print(f"Figure 3 leaves out {row(m)}: its run {spec.key} has no figure3.npz")
            continue
        names.append(row(m))
        try:
            _read_figure_slices(f, row(m), examples)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(
                f"{f} is truncated or corrupted ({type(e).__name__}: {e}); delete the run's "
                f"folder {f.parent} to redo that run"
            ) from e
    if not examples:
        return None
    return figure_comparison([examples[k] for k in sorted(examples)], names, dest / "figure3.png")


def _read_figure_slices(f: Path, name: str, examples: dict[str, dict]) -> None:
    """The slices of one run's figure3.npz into `examples` (by slice index)."""
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


def _timing_text(plan: BenchmarkPlan, out: Path, found) -> str:
    total = 0.0
    for runs in found.values():
        for spec, _ in runs:
            f = out / "runs" / spec.key / "timing.json"
            if f.exists():
                t = json.loads(f.read_text())
                total += t.get("train_s", 0) + t.get("evaluate_s", 0)
    return (
        f"Training and evaluation time of the finished runs, added up: {total / 60:.0f} min "
        "(runs done side by side in several processes overlap in wall time)."
    )


__all__ = ["BenchmarkPlan", "RunSpec", "collect", "run_benchmark"]
