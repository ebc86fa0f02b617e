"""The paper's training and inference path end to end, as a first run on a GPU takes it:
`trainer.train` compiled in bf16 through a last partial batch, a validation and a
checkpoint, a resume from that checkpoint, then `load_model` with compilation on and
one volume reconstructed, compared with the eager model's.

    python benchmarks/gpu_end_to_end.py --out e2e                  # one CUDA GPU, paper scale
    python benchmarks/gpu_end_to_end.py --device cpu --scale tiny --compile off --out e2e

benchmarks/gpu_check.sh runs it (at most 4 minutes at the paper scale on one H100 or
H200, compilation included); the tests run it at the tiny scale on the CPU. Steps:

1. data: synthetic volumes (smooth random fields inside an ellipsoid brain, as
   bench_gpu.py draws them) at the scale's volume shape, one slice each per epoch:
   batch + batch/4 training volumes, so that every epoch ends with a partial batch
   (paper: 32 + 8 slices), and two validation volumes;
2. `trainer.train` for --steps steps (default 40) with the preset's precision (the
   paper scale: bf16 on a CUDA GPU that has it) and train.compile=--compile,
   validating every half of the steps and checkpointing at the epoch end nearest the
   middle; the run folder at that checkpoint is copied aside;
3. the copy resumes (`resume=True`) and trains to the same --steps;
4. `load_model` of the run with inference.compile on and off: one volume reconstructed
   by each with the same noise, in the preset's inference precision.

The exit status is non-zero when a check fails, each printed and listed in the JSON
report (--json): the steps, losses and validations are those asked for and finite, no
compiled network fell back to eager (a RuntimeWarning of torch.compile), the resumed
run ends at the same step (on the CPU with the same weights, bit for bit; on a GPU
within the drift of cuDNN's autotuned kernels), and the compiled model's anomaly maps
|x - rec| lie within MAP_TOLERANCE of the eager model's inside the brain.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maediff.config import apply_overrides, get_preset
from maediff.data.datasets import SliceSet
from maediff.device import reset_compiled, resolve_device
from maediff.registry import preset_name
from maediff.training import trainer
from maediff.training.checkpoint import load_model
from maediff.training.data import TrainingData

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import BF16_MAP_TOLERANCE, agreement_failures, map_agreement  # noqa: E402
from study_tools import finish_report  # noqa: E402

# compiled against eager inference in the same precision: the kernels differ (fusion
# keeps intermediates in fp32 where eager rounds each op), so bf16's tolerance
MAP_TOLERANCE = BF16_MAP_TOLERANCE
# a resumed run on a GPU: how far its final weights may lie from the uninterrupted
# run's, as a share of how far the uninterrupted run moved them after the checkpoint
# (L2 norms over all weights). cuDNN's autotuned kernels and atomic additions drift by
# rounding; a resume that lost the optimizer's moments, the schedule or the weights
# moves them by a share near 1 or more. A first setting, to be checked on a GPU
GPU_RESUME_TOLERANCE = 0.25


@dataclass
class Volume:
    """What SliceSet takes: a name, the image (X, Y, Z) and its brain mask."""

    name: str
    image: np.ndarray
    brain_mask: np.ndarray


def synthetic_volumes(n: int, shape: tuple[int, int, int], seed: int) -> list[Volume]:
    from bench_gpu import random_volumes

    X = shape[0]
    images, masks = random_volumes(n, shape, X, torch.Generator().manual_seed(seed))
    out = []
    for i in range(n):  # (Z, 1, X, Y) -> (X, Y, Z)
        image = images[i, :, 0].permute(1, 2, 0).numpy().astype(np.float32)
        mask = masks[i, :, 0].permute(1, 2, 0).numpy() > 0
        out.append(Volume(f"synthetic-{seed}-{i}", image, mask))
    return out


def run_config(preset: str, steps: int, compile_mode: str, per_epoch: int):
    """The preset with a budget of `steps` steps, validation every half of them and a
    checkpoint at the epoch end nearest the middle (and at the end)."""
    cfg = get_preset(preset)
    half_epochs = max(1, round(steps / 2 / per_epoch))
    return apply_overrides(
        cfg,
        [
            f"train.max_steps={steps}",
            "train.epochs=null",
            "train.max_minutes=0",
            f"train.val_every_steps={max(1, steps // 2)}",
            "train.checkpoint_every_minutes=0",
            f"train.checkpoint_every={half_epochs}",
            f"train.compile={compile_mode}",
            f"inference.compile={compile_mode}",
        ],
    )


class CopyAtCheckpoint:
    """Wraps trainer._checkpoint: after the first checkpoint at or past `step` the run
    folder is copied to `dest` (a run interrupted there, to resume)."""

    def __init__(self, step: int, dest: Path):
        self.step, self.dest, self.copied_at = step, dest, None
        self.real = trainer._checkpoint

    def __call__(self, run: Any) -> None:
        self.real(run)
        if self.copied_at is None and run.state.step >= self.step:
            shutil.copytree(run.run_dir, self.dest)
            shutil.copy(
                run.run_dir / "last.safetensors", self.dest.parent / "at_checkpoint.safetensors"
            )
            self.copied_at = run.state.step

    def __enter__(self):
        trainer._checkpoint = self
        return self

    def __exit__(self, *exc):
        trainer._checkpoint = self.real
        return False


def compile_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]


def validation_steps(run_dir: Path) -> list[int]:
    rows = (run_dir / "log.csv").read_text().splitlines()
    col = rows[0].split(",").index("val_loss")
    return [int(r.split(",")[0]) for r in rows[1:] if r.split(",")[col]]


def weights_difference(a: Path, b: Path, start: Path) -> float:
    """||a - b|| / ||a - start||: how far the weights of file b lie from those of a, as a
    share of how far a moved from `start` (inf when the keys differ)."""
    from safetensors.torch import load_file

    wa, wb, w0 = load_file(str(a)), load_file(str(b)), load_file(str(start))
    if not wa.keys() == wb.keys() == w0.keys():
        return math.inf
    apart = sum(float((wa[k].double() - wb[k].double()).square().sum()) for k in wa)
    moved = sum(float((wa[k].double() - w0[k].double()).square().sum()) for k in wa)
    return math.sqrt(apart) / max(math.sqrt(moved), 1e-30)


def end_to_end(
    device: str, scale: str, steps: int, compile_mode: str, out: Path, seed: int = 0
) -> dict[str, Any]:
    """The steps of the module docstring; returns the report with its `failures`."""
    t0 = time.perf_counter()
    preset = preset_name("maediff", scale)
    base = get_preset(preset)
    dev = resolve_device(device)
    batch = base.train.batch_size
    n_train = batch + max(1, batch // 4)  # every epoch: one full batch and a partial one
    per_epoch = math.ceil(n_train / batch)
    cfg = run_config(preset, steps, compile_mode, per_epoch)
    shape = base.data.volume_shape
    H = base.geometry.image_size
    volumes = synthetic_volumes(n_train + 3, shape, seed)
    data = TrainingData(
        SliceSet(volumes[:n_train], H), SliceSet(volumes[n_train : n_train + 2], H), "synthetic"
    )
    failures: list[str] = []
    report: dict[str, Any] = {
        "preset": preset,
        "device": str(dev),
        "steps": steps,
        "batch": batch,
        "epoch_slices": n_train,
        "last_batch": n_train % batch,
        "train_amp": cfg.train.amp,
        "compile": compile_mode,
    }
    run_dir, resumed_dir = out / "run", out / "resumed"
    for d in (run_dir, resumed_dir):
        if d.exists():
            shutil.rmtree(d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        t = time.perf_counter()
        with CopyAtCheckpoint(steps // 2, resumed_dir) as copy:
            summary = trainer.train(cfg, data, run_dir, device=device, progress=False)
        report["train_s"] = time.perf_counter() - t
        report["checkpoint_copied_at"] = copy.copied_at
        # each model's compiled graphs are its own (Dynamo guards on the module):
        # forgotten between the models of this process, as `maediff benchmark` does,
        # so that the later ones do not pass the recompile limit
        reset_compiled()
        t = time.perf_counter()
        if copy.copied_at is not None:
            resumed = trainer.train(
                cfg, data, resumed_dir, device=device, resume=True, progress=False
            )
        report["resume_s"] = time.perf_counter() - t
        reset_compiled()
    fallbacks = compile_warnings(caught)
    vals = validation_steps(run_dir)
    report.update(
        final_train_loss=summary["final_train_loss"],
        best_val_loss=summary["best_val_loss"],
        validations=vals,
        compile_fallbacks=fallbacks,
    )
    if summary["steps"] != steps:
        failures.append(f"training: {summary['steps']} steps, not {steps}")
    if not (math.isfinite(summary["final_train_loss"] or math.nan)):
        failures.append("training: the loss is not finite")
    if not vals or not math.isfinite(summary["best_val_loss"]):
        failures.append("training: no finite validation loss")
    if steps <= per_epoch:
        failures.append(f"training: {steps} steps do not reach the epoch's last partial batch")
    if fallbacks:
        failures.append(f"torch.compile fell back to eager: {fallbacks[0]}")
    if copy.copied_at is None or copy.copied_at >= steps:
        failures.append("no checkpoint before the end to resume from")
    else:
        report["resumed_steps"] = resumed["steps"]
        diff = weights_difference(
            run_dir / "last.safetensors",
            resumed_dir / "last.safetensors",
            out / "at_checkpoint.safetensors",
        )
        report["resume_weight_difference"] = diff
        limit = 0.0 if dev.type == "cpu" else GPU_RESUME_TOLERANCE  # the CPU: bit for bit
        if resumed["steps"] != steps:
            failures.append(f"resume: ended at step {resumed['steps']}, not {steps}")
        if not diff <= limit:
            failures.append(
                f"resume: its weights lie {diff:.3g} of the last steps' change away from "
                f"the uninterrupted run's (tolerance {limit:g})"
            )
    # inference as detect/evaluate run it: load_model with the speed settings
    compile_on = "on" if compile_mode != "off" else "off"
    eager = load_model(run_dir, dev, ["inference.compile=off"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        compiled = load_model(run_dir, dev, [f"inference.compile={compile_on}"])
        x = torch.from_numpy(volumes[-1].image).permute(2, 0, 1)[:, None]  # (Z, 1, X, Y)
        brain = torch.from_numpy(volumes[-1].brain_mask).permute(2, 0, 1)[:, None].float()
        if x.shape[-1] != H:
            x = torch.nn.functional.interpolate(x, size=(H, H), mode="area")
            brain = (torch.nn.functional.interpolate(brain, size=(H, H), mode="area") > 0).float()
        noise = eager.noise(x.shape[0], torch.Generator().manual_seed(seed + 1))
        t = time.perf_counter()
        rec_c = compiled.reconstruct(x, noise=noise, brain_mask=brain)
        report["compiled_reconstruct_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rec_e = eager.reconstruct(x, noise=noise, brain_mask=brain)
    report["eager_reconstruct_s"] = time.perf_counter() - t
    fallbacks = compile_warnings(caught)
    states = [getattr(m, "compile_state", None) for m in compiled.compile_targets()]
    report["inference_compiled"] = bool(states) and all(
        s is not None and s.compiled for s in states
    )
    report["inference_amp"] = compiled.cfg.inference.amp
    if compile_on == "on" and not report["inference_compiled"]:
        failures.append(
            "inference: the compiled model did not run compiled"
            + (f" ({fallbacks[0]})" if fallbacks else "")
        )
    if rec_c.device.type != dev.type:
        failures.append("inference: the reconstruction left the device")
    x_dev, brain_dev = x.to(rec_c.device), brain.to(rec_c.device)
    agreement = map_agreement(
        (x_dev - rec_c).abs(), (x_dev - rec_e.to(rec_c.device)).abs(), brain_dev
    )
    report["compiled_vs_eager"] = agreement
    failures += agreement_failures(
        "inference: compiled maps differ from eager's", agreement, MAP_TOLERANCE
    )
    report["seconds"] = time.perf_counter() - t0
    report["failures"] = failures
    return report


def markdown(r: dict[str, Any]) -> str:
    a = r["compiled_vs_eager"]
    lines = [
        f"end to end: {r['preset']} on {r['device']}, {r['steps']} steps of batch {r['batch']} "
        f"(epoch {r['epoch_slices']} slices, last batch {r['last_batch']}), train.amp "
        f"{r['train_amp']}, compile {r['compile']}",
        "",
        "| check | result |",
        "|---|---|",
        f"| training | {r['train_s']:.1f} s; loss {r['final_train_loss']:.4f}, validations at "
        f"steps {r['validations']}, best {r['best_val_loss']:.4f} |",
        f"| resume from step {r['checkpoint_copied_at']} | {r['resume_s']:.1f} s; "
        f"ended at step {r.get('resumed_steps', 'n/a')}, weights differ by "
        f"{r.get('resume_weight_difference', math.nan):.3g} of the last steps' change |",
        f"| inference (load_model, {r['inference_amp']}) | compiled "
        f"{r['compiled_reconstruct_s']:.2f} s (first call), eager {r['eager_reconstruct_s']:.2f} s "
        f"per volume; ran compiled: {r['inference_compiled']} |",
        f"| maps, compiled vs eager, in the brain | mean {a['mean']:.2e}, 99.9th pct "
        f"{a['p999']:.2e}, max {a['max']:.2e} |",
        "",
        f"run {r['seconds']:.0f} s",
    ]
    lines += [f"FAILED: {f}" for f in r["failures"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:1 or cpu")
    ap.add_argument("--scale", choices=["paper", "cpu", "tiny"], default="paper")
    ap.add_argument("--steps", type=int, default=40, help="training steps (>= 4)")
    ap.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="on",
        help="train.compile and the compiled model's inference.compile",
    )
    ap.add_argument("--out", type=Path, help="folder for the two runs (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write the report as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error("--steps must be >= 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="maediff-e2e-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = end_to_end(args.device, args.scale, args.steps, args.compile, out, args.seed)
    return finish_report(report, markdown(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
