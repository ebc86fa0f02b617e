"""One benchmark run: train (or resume) the run's model, probe it, evaluate it with the
paper's protocol, keep Figure 3's slices and its timings, then mark it done.

Every (model, fold, seed) is one run in its own folder, OUT/runs/MODEL/fold{F}-seed{S}/:
config.yaml (the resolved configuration; a different one for an existing folder is
refused), train/ (the training run, resumed from its last checkpoint after an
interruption), eval/ (the paper's protocol), probe.json (the models that declare
`patch_probe`: benchmark/probe.py), figure3.npz (the slices of Figure 3), timing.json
and status.json, whose "done", written after everything else, marks a finished run.
Each step whose result exists is skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, load_config, save_config, to_dict
from ..data.datasets import load_subject
from ..data.splits import read_pddpm_split
from ..device import reset_compiled, resolve_device
from ..models import MODELS, build_model
from ..names import FIGURE_SUBJECTS
from ..outputs import clean_stale, temp_path
from ..pipeline.detect import reconstruct_volume
from ..pipeline.evaluate import evaluate_model
from ..reporting.benchmark import figure_key
from ..reporting.files import write_atomic
from ..reporting.runs import load_summary
from ..reporting.summary import SUMMARY_FILE
from ..training.data import prepare_training_data
from ..training.trainer import train
from ..weights import load_model
from .plan import BenchmarkPlan, RunSpec, row
from .probe import mae_input_dependence, patch_probe, probe_slices
from .status import mark_status


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
        model = build_model(cfg).to(resolve_device(device))
    if trained or "train_s" not in timing:
        timing["train_s"] = round(time.perf_counter() - t0, 1)
    if model.patch_probe:  # the models that declare it (benchmark/probe.py)
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
    """The patch probe and, with a branch (the MAE), its input dependence (benchmark/probe.py)."""
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


__all__ = ["check_run_config", "execute_run", "save_figure_slices", "write_probe"]
