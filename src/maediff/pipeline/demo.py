"""`maediff demo`: the whole job offline on the synthetic benchmark.

synth (default sizes) -> the MAEDiff model(s) -> evaluate them and the intensity-
thresholding baseline live on the same test volumes -> one report.

Which MAEDiff (`model`): "shipped" (the default) is the `cpu` model that ships with the
package (maediff.pretrained: trained much longer on the same seed-0 synthetic
benchmark, its card says how), "train" trains the `cpu` preset here, with tiled
patches for the demo's step budget (DEMO_STEPS, below), "both" does both and shows them
side by side. Every number is computed on the
spot; nothing is precomputed.

The budget is a number of steps (train.max_steps of the `cpu` scale), so that every
machine trains the same model: a faster CPU finishes sooner, a slower one later, and
the numbers of docs/results.md are what it gets (a wall-clock budget, `minutes`, is
there for those who want one, and gives a different model on a different machine).
Before training, one step and one reconstruction pass are timed on this machine and
the time the demo will take is printed. Stage times go to OUT/demo_timing.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..config import Config, apply_overrides, get_preset
from ..data.synthetic import SynthConfig, generate_benchmark
from ..device import autocast_context, resolve_amp, resolve_device
from ..models import build_model
from ..pretrained import checkpoint_path
from ..reporting.runs import load_summary, write_report
from ..training.data import prepare_training_data
from ..training.trainer import train
from ..weights import load_model
from .evaluate import evaluate_model, plan_evaluation

# The model trained here (--model train or both) is the preset with tiled patches:
# geometry.stride = the patch size, 4 positions per 48 px slice instead of Alg. 2's 16
# overlapping ones. It trains only where Alg. 2 then evaluates, and its evaluation takes a
# quarter of the passes; the minutes that frees train for DEMO_STEPS steps instead of the
# preset's 300 (docs/results.md, "The model trained in the demo"). `--set
# geometry.stride=8` gives the preset's overlapping patches back.
DEMO_STEPS = {"cpu": 500}


def demo_config(
    preset: str = "cpu",
    seed: int = 0,
    steps: int | None = None,
    minutes: float | None = None,
    amp: str | None = None,
    overrides: Sequence[str] = (),
    tiled: bool = True,
) -> Config:
    """The demo's configuration: the preset, with tiled patches and the demo's step
    budget (`tiled`, above), then the overrides ("section.key=value"), seed, budget and
    amp given."""
    cfg = get_preset(preset)
    if tiled:
        cfg = replace(cfg, geometry=replace(cfg.geometry, stride=cfg.geometry.patch_size))
        if steps is None and minutes is None and preset in DEMO_STEPS:
            steps = DEMO_STEPS[preset]
    cfg = apply_overrides(cfg, list(overrides))
    tr = replace(cfg.train, seed=seed, amp=amp or cfg.train.amp)
    # a budget given here is the only limit (the preset's epochs would stop it earlier)
    if steps is not None:
        tr = replace(tr, max_steps=steps, max_minutes=0.0, epochs=None)
    if minutes is not None:
        tr = replace(tr, max_minutes=minutes, max_steps=0, epochs=None)
    return replace(cfg, train=tr, inference=replace(cfg.inference, amp=amp or cfg.inference.amp))


def estimate_seconds(cfg: Config, n_volumes: int, slices: int, device: torch.device) -> dict:
    """Time one training step and one reconstruction pass of this model on this machine
    (random inputs, after a warm-up) and project the demo's two long stages."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), cfg.train.lr)
    H = cfg.geometry.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.train.batch_size, 1, H, H, generator=g).to(device)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        with autocast_context(device, cfg.train.amp):
            loss = model(x, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    step_s = min(times[1:])
    model.eval()
    few = x[:2]
    model.reconstruct(few, g)
    t = time.perf_counter()
    model.reconstruct(few, g)
    per_slice = (time.perf_counter() - t) / len(few)
    steps = cfg.train.max_steps
    train_s = steps * step_s if steps else 60 * cfg.train.max_minutes
    return {
        "step_s": round(step_s, 3),
        "train_s": round(train_s),
        "evaluate_s": round(n_volumes * slices * per_slice),
    }


DEMO_MODELS = ("shipped", "train", "both")


def precision_line(amp: str, device: torch.device) -> str:
    """What the demo computes in, in words: amp as asked and as resolved here."""
    used = resolve_amp(amp, device)
    name = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(used, used)
    why = ""
    if amp == "auto":
        why = (
            " (amp=auto: native bf16 here)"
            if used == "bf16"
            else " (amp=auto: no native bf16 here)"
        )
    return f"precision: {name} on {device}{why}"


def run_demo(
    out: Path,
    minutes: float | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    amp: str | None = None,
    synth: SynthConfig | None = None,
    preset: str = "cpu",
    steps: int | None = None,
    overrides: Sequence[str] = (),
    model: str = "shipped",
    shipped: Path | None = None,
    say: Callable[..., None] = print,
) -> dict:
    """The demo into `out` (resumable: synthesis and training are skipped when done).
    shipped: the shipped checkpoint to evaluate (default: maediff.pretrained's). `say`
    takes each line for the user (print, or a caller's; and flush=)."""
    if model not in DEMO_MODELS:
        raise ValueError(f"model={model!r} must be one of {', '.join(DEMO_MODELS)}")
    if model == "shipped" and (steps is not None or minutes is not None or overrides):
        raise ValueError(
            "--steps, --minutes and --set change the model trained here: add --model train "
            "(or both); the shipped model is evaluated as it is"
        )
    cfg = demo_config(preset, seed, steps, minutes, amp, overrides)
    dev = resolve_device(device)
    if model != "train":  # found (or refused) before anything is written
        shipped = Path(shipped) if shipped is not None else checkpoint_path("maediff-cpu")
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    data = out / "data"
    say(f"maediff demo: {precision_line(cfg.train.amp, dev)}", flush=True)
    t = time.perf_counter()
    if not (data / "synthetic.json").exists():
        generate_benchmark(data, synth or SynthConfig(seed=seed), overwrite=True, progress=progress)
    timing["synth_s"] = round(time.perf_counter() - t, 1)

    # the protocol without the label-free rows (their healthy validation volumes would
    # add half again to the evaluation): what the demo shows is Table 1's protocol
    plan = plan_evaluation(data, healthy_val=False)
    n_volumes = len(plan.subjects())
    rows = []  # (folder name, label, checkpoint)
    if model != "train":
        rows.append(("eval-shipped", "MAEDiff (shipped)", shipped))
    if model != "shipped":
        run = out / "run"
        _train_here(cfg, data, run, dev, device, n_volumes, progress, timing, say)
        rows.append(("eval-maediff", "MAEDiff (trained here)", run))

    for folder, label, ckpt in rows:
        t = time.perf_counter()
        evaluate_model(
            load_model(ckpt, dev, overrides=[f"inference.amp={cfg.inference.amp}"]),
            data,
            out / folder,
            label=label,
            seed=seed,
            n_jobs=1,
            progress=progress,
            plan=plan,
            overwrite=True,  # a demo run again evaluates again
        )
        timing[f"evaluate_{folder[5:]}_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    evaluate_model(
        build_model(replace(cfg, model="thresh", name="thresh-cpu")),
        data,
        out / "eval-thresh",
        label="Thresh",
        seed=seed,
        n_jobs=2,  # nothing to reconstruct: the post-processing is the work
        progress=progress,
        plan=plan,
        overwrite=True,
    )
    timing["evaluate_thresh_s"] = round(time.perf_counter() - t, 1)

    page = write_report(
        [load_summary(out / folder) for folder, _, _ in rows] + [load_summary(out / "eval-thresh")],
        out / "report",
    )
    stages = {k: v for k, v in timing.items() if k.endswith("_s")}
    timing["total_s"] = stages["total_s"] = round(sum(stages.values()), 1)
    timing["precision"] = precision_line(cfg.train.amp, dev)  # type: ignore[assignment]
    timing["model"] = model  # type: ignore[assignment]
    (out / "demo_timing.json").write_text(json.dumps(timing, indent=2))
    say((out / "report" / "results.md").read_text())
    say(f"stage times (s): {stages}")
    say(precision_line(cfg.train.amp, dev))
    say(f"report: {page.resolve()}")
    return timing


def _train_here(
    cfg: Config,
    data: Path,
    run: Path,
    dev: torch.device,
    device: str,
    n_volumes: int,
    progress: bool,
    timing: dict,
    say: Callable[..., None] = print,
) -> None:
    """Train the demo's model into `run` (skipped when it is there), with an estimate
    of the time it and its evaluation take printed first."""
    trained = (run / "train_summary.json").exists()
    if not trained:
        est = estimate_seconds(cfg, n_volumes, cfg.data.volume_shape[2], dev)
        budget = (
            f"{cfg.train.max_steps} steps of {cfg.train.batch_size} slices"
            if cfg.train.max_steps
            else f"{cfg.train.max_minutes:g} minutes"
        )
        g = cfg.geometry
        say(
            f"maediff demo: training {cfg.name} (patches of {g.patch_size} px at stride "
            f"{g.stride}) for {budget} (about {est['train_s'] / 60:.1f} min "
            f"here, {est['step_s']:.2f} s per step), then evaluating {n_volumes} volumes "
            f"(about {est['evaluate_s'] / 60:.1f} min in one process)",
            flush=True,
        )
        timing["estimate"] = est
    t = time.perf_counter()
    if not trained:
        td = prepare_training_data(cfg, data, progress=progress)
        train(cfg, td, run, device=device, progress=progress)
    timing["train_s"] = round(time.perf_counter() - t, 1)
    timing["train_steps"] = json.loads((run / "train_summary.json").read_text())["steps"]
