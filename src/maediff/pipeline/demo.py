"""`maediff demo`: the whole job offline on the synthetic benchmark.

synth (default sizes) -> train the `cpu` preset for its time budget -> evaluate MAEDiff
and the intensity-thresholding baseline on the same test volumes -> one report.
Stage times go to OUT/demo_timing.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..config import get_preset
from ..data.synthetic import SynthConfig, generate_benchmark
from ..device import resolve_device
from ..models import build_model
from ..training.checkpoint import load_model
from ..training.trainer import prepare_training_data, train
from .evaluate import evaluate_model, load_summary, write_report


def run_demo(
    out: Path,
    minutes: float | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    amp: str | None = None,
    synth: SynthConfig | None = None,
    preset: str = "cpu",
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    data = out / "data"
    t = time.perf_counter()
    if not (data / "synthetic.json").exists():
        generate_benchmark(data, synth or SynthConfig(seed=seed), overwrite=True, progress=progress)
    timing["synth_s"] = round(time.perf_counter() - t, 1)

    cfg = get_preset(preset)
    tr = cfg.train if minutes is None else replace(cfg.train, max_minutes=minutes)
    cfg = replace(
        cfg,
        train=replace(tr, seed=seed, amp=amp or tr.amp),
        inference=replace(cfg.inference, amp=amp or cfg.inference.amp),
    )
    run = out / "run"
    t = time.perf_counter()
    if not (run / "train_summary.json").exists():
        td = prepare_training_data(cfg, data, progress=progress)
        train(cfg, td, run, device=device, progress=progress)
    timing["train_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    model = load_model(run, resolve_device(device))
    evaluate_model(
        model, data, out / "eval-maediff", "MAEDiff", seed=seed, n_jobs=1, progress=progress
    )
    timing["evaluate_maediff_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    evaluate_model(
        build_model(replace(cfg, model="thresh", name="thresh-cpu")),
        data,
        out / "eval-thresh",
        "Thresh",
        seed=seed,
        n_jobs=1,
        progress=progress,
    )
    timing["evaluate_thresh_s"] = round(time.perf_counter() - t, 1)

    page = write_report(
        [load_summary(out / "eval-maediff"), load_summary(out / "eval-thresh")], out / "report"
    )
    timing["total_s"] = round(sum(timing.values()), 1)
    (out / "demo_timing.json").write_text(json.dumps(timing, indent=2))
    print((out / "report" / "results.md").read_text())
    print(f"stage times (s): {timing}")
    print(f"report: {page.resolve()}")
    return timing
