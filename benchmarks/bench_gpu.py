"""The paper's scale on one GPU, in at most five minutes: what a training step and one
volume's reconstruction cost there, and what Table 1 costs in GPU-hours.

    python benchmarks/bench_gpu.py --json bench_gpu.json              # one CUDA device
    torchrun --nproc_per_node 2 benchmarks/bench_gpu.py               # + DDP steps (NCCL)
    python benchmarks/bench_gpu.py --device cpu --scale tiny --steps 3   # the CPU check

Measured in the run, on synthetic random volumes (smooth random fields inside an
ellipsoid "brain") and untrained weights (the zero-initialised layers drawn, so that the
maps depend on the input; speed does not depend on the weights):

1. environment: torch, CUDA, the GPU's name, memory and compute capability, native bf16
   and TF32;
2. the bf16 matmul peak of the device (fp32 where bf16 is not native, e.g. most CPUs);
3. first, with its own budget (--first-row-minutes) in a child process: MAEDiff's
   training as the paper scale runs it, compiled (on CUDA) in bf16 (where native);
4. training of MAEDiff and pDDPM s16 at --scale (paper: 96x96 slices, batch 32) as the
   trainer steps (models/base.py contract, train.* speed settings): steps/s, slices/s
   and peak GPU memory, eager in fp32 (TF32 matmuls on CUDA, as the package sets them)
   and bf16 autocast, then pDDPM compiled in bf16 (torch.compile of the networks, first
   step = compilation, timed apart); the loss must be finite and falls over the steps;
5. `reconstruct` (paper Alg. 2, every patch, as the evaluation protocol runs it) of one
   96x96x50 volume: seconds per volume, (slice, patch) pairs/s, the achieved TFLOP/s
   (FLOPs of one network forward from torch.utils.flop_counter) as a share of the peak,
   and how far the anomaly maps |x - rec| of bf16 lie from those of true fp32 (TF32
   off; same noise) inside the brain: mean, 99.9th percentile and maximum;
6. under torchrun (WORLD_SIZE set): a few DDP steps of MAEDiff over every rank;
7. Table 1's GPU-hours for these two models recomputed from the measured costs: five
   folds of 1600 epochs of about 12 steps of 32 slices, and 1,439 evaluated volumes per
   fold, with the fastest measured training and reconstruction of each model, labelled
   with the precision they ran in (tf32, not fp32, where TF32 was on).

Compiled rows run in a child process that is stopped when its budget is spent (a
paper-scale compilation can take minutes). A row that was started and did not come
back (the child raised, ran out of memory, crashed or was stopped) FAILS the run; a
later row that was never started because the budget left less than --compile-reserve
seconds is skipped, and says so. On CUDA the fp32 rows are labelled tf32: the package
lets matmuls and convolutions use TF32 there. The table is printed as Markdown and,
with --json PATH, written as JSON.

The exit status is non-zero when a check fails (`failures`): a failed row, a
non-finite training loss, a compiled row that fell back to eager or compiled nothing,
a reconstruction that did not come back on the device, or bf16 anomaly maps further
from true fp32's than BF16_MAP_TOLERANCE (mean or 99.9th percentile). Every failure is
printed, and listed in the JSON.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from study_tools import finish_report, median_seconds
from study_tools import matmul_peak as study_matmul_peak
from torch.utils.flop_counter import FlopCounterMode

from maediff import __version__
from maediff.config import get_preset
from maediff.device import (
    autocast_context,
    cuda_bf16_native,
    full_fp32,
    resolve_amp,
    resolve_device,
    speed_up,
)
from maediff.models import build_model
from maediff.models.maediff import to_model_range
from maediff.registry import preset_info, preset_name, split_preset_name
from maediff.training import trainer
from maediff.training.distributed import setup_distributed, wrap_distributed

MODELS = ("maediff", "pddpm-s16")
# how far, inside the brain, the anomaly maps |x - rec| of bf16 reconstructions may lie
# from those of true fp32 (TF32 off; same noise, images in [0, 1]): the mean and the
# 99.9th percentile of the absolute difference. A wrong kernel (a perturbation of 1 %
# of the output range) passes neither; a detection threshold is about 0.1
BF16_MAP_TOLERANCE = {"mean": 2e-3, "p999": 2e-2}
# Table 1's budget (docs/method.md "Training", the protocol's splits)
FOLDS, EPOCHS, STEPS_PER_EPOCH, EVAL_VOLUMES = 5, 1600, 12, 1439


# ------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any], dev: torch.device) -> float:
    """Wall seconds of one call of fn(), the device's queue drained before and after."""
    return median_seconds(fn, 1, dev)


class Deadline:
    def __init__(self, minutes: float):
        self.end = time.perf_counter() + 60 * minutes

    def left(self) -> float:
        return self.end - time.perf_counter()


# ------------------------------------------------------------------ environment and peak


def bf16_native(dev: torch.device) -> bool:
    return cuda_bf16_native(dev) if dev.type == "cuda" else resolve_amp("auto", dev) == "bf16"


def environment(dev: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(dev),
        "maediff": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16_native": bf16_native(dev),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=p.name,
            memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            tf32=p.major >= 8,  # TF32 tensor cores from Ampere on
        )
    else:
        env.update(
            gpu=None,
            cpu=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
            tf32=False,
        )
    return env


def matmul_peak(dev: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a square matmul in `dtype` (study_tools.matmul_peak: 8192^2 on a GPU)."""
    n = 8192 if dev.type == "cuda" else 512
    return study_matmul_peak(dtype, dev, n=n, repeats=20 if dev.type == "cuda" else 4) / 1e3


# ------------------------------------------------------------------ data and models


def random_volumes(
    n: int, shape: tuple[int, int, int], size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n volumes as slices (n, Z, 1, size, size) in [0, 1] and their brain masks: smooth
    random fields (trilinear from a coarse grid) inside an ellipsoid, 0 outside."""
    X, Y, Z = shape
    coarse = torch.rand(n, 1, max(2, Z // 8), 6, 6, generator=gen)
    field = F.interpolate(coarse, size=(Z, X, Y), mode="trilinear", align_corners=False)
    zz, xx, yy = torch.meshgrid(
        torch.linspace(-1, 1, Z), torch.linspace(-1, 1, X), torch.linspace(-1, 1, Y), indexing="ij"
    )
    brain = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 + (zz / 1.15) ** 2 <= 1).float()
    images = ((0.2 + 0.8 * field) * brain).transpose(1, 2)  # (n, Z, 1, X, Y)
    masks = brain[None, :, None].expand(n, -1, -1, -1, -1)
    if (X, Y) != (size, size):
        images = F.interpolate(images.flatten(0, 1), size=(size, size), mode="area").unflatten(
            0, (n, Z)
        )
        masks = F.interpolate(masks.flatten(0, 1), size=(size, size), mode="area").unflatten(
            0, (n, Z)
        )
    return images.contiguous(), (masks > 0).float()


def draw_zero_layers(model: torch.nn.Module, seed: int = 0) -> None:
    """Untrained diffusion U-Nets output zeros (zero-initialised output convolutions):
    draw those layers, so that a reconstruction, and its bf16 error, depends on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------ training


def train_row(
    preset: str,
    dev: torch.device,
    amp: str,
    compiled: bool,
    steps: int,
    warmup: int,
    seed: int,
    net_wrapper: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """`steps` timed training steps (after `warmup` untimed ones) on random batches, as
    the trainer takes them: zero_grad, autocast forward of the loss, backward, Adam."""
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = build_model(cfg).to(dev)
    notes = speed_up(model, dev, "auto", "on" if compiled else "off", training=True)
    opt = trainer.build_optimizers(model, cfg)["model"]
    net = net_wrapper(model) if net_wrapper else model
    gen = torch.Generator().manual_seed(seed)
    H, B = cfg.geometry.image_size, cfg.train.batch_size
    if net_wrapper is not None:  # DDP: train.batch_size is the global batch
        B = max(1, B // int(os.environ.get("WORLD_SIZE", "1")))
    images, _ = random_volumes(8, cfg.data.volume_shape, H, gen)
    images = images.to(dev)
    n, Z = images.shape[:2]
    picks = [
        (
            torch.randint(n, (B,), generator=gen).to(dev),
            torch.randint(Z, (B,), generator=gen).to(dev),
        )
        for _ in range(warmup + steps)
    ]
    losses: list[torch.Tensor] = []

    def step(i: int) -> None:
        v, z = picks[i]
        model.zero_grad(set_to_none=True)
        with autocast_context(dev, amp):
            loss = net(images[v, z], gen)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        first = timed(lambda: step(0), dev)  # compilation, cuDNN autotuning
        for i in range(1, warmup):
            step(i)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = timed(lambda: [step(i) for i in range(warmup, warmup + steps)], dev)
    values = torch.stack(losses).float().cpu()
    k = max(1, len(values) // 3)
    row = {
        "preset": preset,
        "model": preset_info(split_preset_name(preset)[0]).row,
        "mode": "compiled" if compiled else "eager",
        "amp": amp,
        "batch": B,
        "steps": steps,
        "first_step_s": round(first, 3),
        "steps_per_s": steps / seconds,
        "slices_per_s": steps * B / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30
        if dev.type == "cuda"
        else None,
        "loss_first": float(values[0]),
        "loss_last": float(values[-1]),
        "loss_finite": bool(torch.isfinite(values).all()),
        "loss_falling": bool(values[-k:].mean() < values[:k].mean()),
        "compile_fallback": [str(w.message) for w in caught if "torch.compile" in str(w.message)],
        "compiled_calls": sum(
            m.compile_state.calls for m in model.compile_targets() if hasattr(m, "compile_state")
        ),
        "speed": notes,
    }
    return row


# BENCH_GPU_FAULT=crash|oom|hang makes the child process of a bounded row fail as a
# paper-scale compilation can (killed by a signal, out of memory, past its budget): the
# tests stand in for those failures with it, on the CPU
FAULT_ENV = "BENCH_GPU_FAULT"


def _row_in_child(queue: Any, kwargs: dict[str, Any]) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    try:
        if fault == "crash":
            os._exit(139)  # as a segmentation fault in a compiled kernel ends a process
        if fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        if fault == "hang":
            time.sleep(3600)
        queue.put(train_row(**kwargs))
    except BaseException as e:  # its message for the row, then the failed exit status
        queue.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        raise


def bounded_train_row(seconds: float, **kwargs: Any) -> dict[str, Any]:
    """`train_row(**kwargs)` in a child process, stopped after `seconds` (a compilation
    that would overrun its budget): its row, or a row that says why it `failed` (the
    child raised, crashed, ran out of memory or was stopped at its budget). A failed
    row is a failure of the run (`failures`), not a skipped one."""
    ctx = multiprocessing.get_context("spawn")  # a fresh CUDA context, no forked one
    queue = ctx.Queue()
    child = ctx.Process(target=_row_in_child, args=(queue, kwargs))
    t0 = time.perf_counter()
    child.start()
    row = None
    while row is None and child.is_alive() and time.perf_counter() - t0 < seconds:
        try:
            row = queue.get(timeout=1.0)
        except Exception:  # queue.Empty: not yet
            continue
    if row is None:
        try:
            row = queue.get(timeout=1.0)
        except Exception:
            pass
    stopped = child.is_alive() and row is None
    if child.is_alive():
        child.terminate()
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join()
    if row is not None and "error" not in row:
        return row
    if stopped:
        why = f"stopped after {seconds:.0f} s, its budget"
    elif row is not None:
        why = f"the child process raised {row['error']}"
    else:
        why = f"the child process died (exit code {child.exitcode})"
    return {
        "preset": kwargs["preset"],
        "mode": "compiled" if kwargs["compiled"] else "eager",
        "amp": kwargs["amp"],
        "failed": why,
        "device": str(kwargs["dev"]),
    }


def release(dev: torch.device, compiled: bool) -> None:
    """After a row (whose model is gone with its function): drop compiled graphs and
    cached GPU memory, so that the next row starts clean."""
    if compiled:
        torch._dynamo.reset()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ reconstruction


def reconstruct_row(
    preset: str, dev: torch.device, slices: int | None, amps: list[str], peak: float, seed: int
) -> dict[str, Any]:
    """Alg. 2 over every (slice, patch) pair of one volume, per autocast in `amps` (the
    same noise), scaled to the whole volume when --slices takes fewer slices."""
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = build_model(cfg)
    draw_zero_layers(model, seed)
    model = model.to(dev).eval()
    speed_up(model, dev, "auto", "off", training=False)
    H, Z = cfg.geometry.image_size, cfg.data.volume_shape[2]
    gen = torch.Generator().manual_seed(seed)
    images, brain = random_volumes(1, cfg.data.volume_shape, H, gen)
    S = min(slices or Z, Z)
    lo = (Z - S) // 2  # the middle slices: the most brain
    x, brain = images[0, lo : lo + S], brain[0, lo : lo + S].to(dev)
    noise = model.noise(S, gen)
    K = model.grid.num_patches
    B = cfg.inference.batch_size
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        xb = to_model_range(x[:1].to(dev)).expand(B, -1, -1, -1)
        k = torch.arange(B, device=dev) % K
        t = torch.full((B,), cfg.diffusion.t_test, device=dev)
        model.denoise(xb, t, k, xb)
    flops_per_pair = fc.get_total_flops() / B
    row: dict[str, Any] = {
        "preset": preset,
        "slices": S,
        "volume_slices": Z,
        "pairs": S * K,
        "gflop_per_pair": flops_per_pair / 1e9,
    }
    maps = {}
    on_device = True
    for amp in amps:

        def run(amp: str = amp) -> torch.Tensor:
            return model.reconstruct(x, noise=noise, amp=amp, brain_mask=None)

        on_device &= run().device.type == dev.type  # lazy initialisation too
        seconds = timed(run, dev)
        maps[amp] = (x.to(dev) - run()).abs()
        achieved = flops_per_pair * S * K / seconds / 1e12
        row[amp] = {
            "seconds_per_volume": seconds * Z / S,
            "pairs_per_s": S * K / seconds,
            "tflops": achieved,
            "share_of_peak": achieved / peak,
        }
    best = min(amps, key=lambda a: row[a]["seconds_per_volume"])
    row["seconds_per_volume"] = row[best]["seconds_per_volume"]
    row["fastest_amp"] = best
    row["on_device"] = on_device
    # channels_last against the contiguous layout above (GroupNorm-heavy networks: NHWC
    # may cost copies), at the fastest autocast
    model.to(memory_format=torch.channels_last)
    run_cl = lambda: model.reconstruct(x, noise=noise, amp=best, brain_mask=None)  # noqa: E731
    run_cl()
    cl = timed(run_cl, dev) * Z / S
    row["channels_last"] = {
        "seconds_per_volume": cl,
        "speedup": row[best]["seconds_per_volume"] / cl,
    }
    if "bf16" in maps:  # against true fp32: TF32 off for the reference
        model.to(memory_format=torch.contiguous_format)
        with full_fp32():
            reference = (x.to(dev) - run("none")).abs()
        row["bf16_vs_fp32"] = map_agreement(maps["bf16"], reference, brain)
        if "none" in maps:  # what TF32 itself changes (speed rows run with it on CUDA)
            row["tf32_vs_fp32"] = map_agreement(maps["none"], reference, brain)
    return row


def map_agreement(a: torch.Tensor, b: torch.Tensor, brain: torch.Tensor) -> dict[str, float]:
    """The absolute difference of two anomaly maps inside the brain: its mean, 99.9th
    percentile and maximum."""
    d = (a.float() - b.float()).abs()[brain > 0].flatten().double().cpu()
    return {
        "mean": float(d.mean()),
        "p999": float(torch.quantile(d, 0.999)),
        "max": float(d.max()),
    }


def agreement_failures(label: str, agreement: dict[str, float] | None, tol: dict) -> list[str]:
    """One line per statistic of `agreement` above its tolerance in `tol`."""
    if agreement is None:
        return []
    return [
        f"{label} by {agreement[k]:.3g} ({k}; tolerance {tol[k]:g})"
        for k in ("mean", "p999")
        if not agreement[k] <= tol[k]
    ]


# ------------------------------------------------------------------ DDP


def ddp_row(device: str, preset: str, steps: int, seed: int) -> tuple[dict[str, Any], bool]:
    """A few DDP steps of `preset` on every rank (NCCL on CUDA, gloo on the CPU); returns
    the row and whether this process is rank 0."""
    ddp = setup_distributed(device)
    dev = resolve_device(device, ddp.local_rank, distributed=True)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return wrap_distributed(model, dev, find_unused_parameters=False)

    amp = "bf16" if bf16_native(dev) else "none"
    row = train_row(preset, dev, amp, False, steps, 2, seed + ddp.rank, net_wrapper=wrap)
    release(dev, False)
    row.update(
        world=ddp.world,
        backend=torch.distributed.get_backend(),
        global_slices_per_s=row["slices_per_s"] * ddp.world,
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return row, ddp.main


# ------------------------------------------------------------------ Table 1


def table1_hours(
    training: list[dict], recon: list[dict], scale: str, tf32: bool = False
) -> dict[str, Any]:
    """GPU-hours of five folds per model: 1600 epochs of ~12 steps (batch 32) and 1,439
    evaluated volumes per fold, at the fastest measured training and reconstruction."""
    out: dict[str, Any] = {
        "assumptions": {
            "folds": FOLDS,
            "epochs": EPOCHS,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "evaluated_volumes_per_fold": EVAL_VOLUMES,
            "scale": scale,
        }
    }
    total = 0.0
    for model in MODELS:
        preset = preset_name(model, scale)
        rows = [r for r in training if r["preset"] == preset and r.get("loss_finite")]
        rows = [r for r in rows if "skipped" not in r and "failed" not in r]
        rec = [
            r for r in recon if r["preset"] == preset and "skipped" not in r and "failed" not in r
        ]
        if not rows or not rec:
            continue
        fast = max(rows, key=lambda r: r["steps_per_s"])
        train_h = FOLDS * EPOCHS * STEPS_PER_EPOCH / fast["steps_per_s"] / 3600
        eval_h = FOLDS * EVAL_VOLUMES * rec[0]["seconds_per_volume"] / 3600
        out[model] = {
            "train_h": train_h,
            "evaluate_h": eval_h,
            "total_h": train_h + eval_h,
            "training": f"{fast['mode']} {amp_name(fast['amp'], tf32)}",
            "reconstruct": amp_name(rec[0]["fastest_amp"], tf32),
        }
        total += train_h + eval_h
    out["total"] = total
    return out


# ------------------------------------------------------------------ the table


def amp_name(amp: str, tf32: bool = False) -> str:
    """The precision of a row: bf16, or fp32, which is tf32 where the package lets CUDA
    matmuls and convolutions use TF32 (device.speed_up, compute capability >= 8)."""
    if amp != "none":
        return amp
    return "tf32" if tf32 else "fp32"


def failures(report: dict[str, Any]) -> list[str]:
    """What makes the run fail: one line per failed check. A row that was started and
    did not come back (crashed, out of memory, stopped at its budget) fails; a row that
    was never started for want of time is skipped, and says so."""
    out = []
    for r in report["training"]:
        label = f"training {r['preset']} {r['mode']} {amp_name(r['amp'])}"
        if "failed" in r:
            out.append(f"{label}: {r['failed']}")
            continue
        if "skipped" in r:
            continue
        if not r["loss_finite"]:
            out.append(f"{label}: the loss is not finite")
        if r["mode"] == "compiled" and r["compile_fallback"]:
            out.append(f"{label}: torch.compile fell back to eager ({r['compile_fallback'][0]})")
        elif r["mode"] == "compiled" and not r.get("compiled_calls"):
            out.append(f"{label}: nothing ran compiled")
    for r in report["reconstruct"]:
        if "failed" in r:
            out.append(f"reconstruct {r['preset']}: {r['failed']}")
            continue
        if "skipped" in r:
            continue
        if not r["on_device"]:
            out.append(f"reconstruct {r['preset']}: the reconstruction left the device")
        out += agreement_failures(
            f"reconstruct {r['preset']}: bf16 maps differ from true fp32's",
            r.get("bf16_vs_fp32"),
            BF16_MAP_TOLERANCE,
        )
    ddp = report.get("ddp")
    if ddp is not None and not ddp["loss_finite"]:
        out.append("DDP: the loss is not finite")
    return out


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}"


def markdown(report: dict[str, Any]) -> str:
    env, peak = report["environment"], report["peak"]
    head = (
        f"maediff {env['maediff']}, torch {env['torch']}, CUDA {env['cuda'] or 'n/a'}, "
        + (
            f"{env['gpu']} ({env['memory_gib']} GiB, sm {env['capability']})"
            if env.get("gpu")
            else f"CPU {env.get('cpu')} ({env.get('threads')} threads)"
        )
        + f"; bf16 native: {env['bf16_native']}, TF32: {env['tf32']}; "
        f"matmul peak {peak['dtype']}: {peak['tflops']:.3g} TFLOP/s; scale {report['scale']}"
    )
    presets = [preset_name(m, report["scale"]) for m in MODELS]
    lines = [head, "", "| measurement | " + " | ".join(preset_info(m).row for m in MODELS) + " |"]
    lines.append("|---" * (len(MODELS) + 1) + "|")

    def add(label: str, cell: Callable[[str], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(p) for p in presets) + " |")

    tf32 = bool(env.get("tf32"))
    for mode, amp in (("eager", "none"), ("eager", "bf16"), ("compiled", report["compiled_amp"])):

        def train_cell(p: str, mode: str = mode, amp: str = amp) -> str:
            r = next(
                (
                    r
                    for r in report["training"]
                    if r["preset"] == p and r["mode"] == mode and r["amp"] == amp
                ),
                None,
            )
            if r is None:
                return "n/a"
            if "failed" in r:
                return f"FAILED: {r['failed']}"
            if "skipped" in r:
                return f"skipped ({r['skipped']})"
            if r.get("compile_fallback") and mode == "compiled":
                return "FELL BACK TO EAGER: " + r["compile_fallback"][0]
            mem = f", {fmt(r['peak_memory_gib'], '.1f')} GiB" if r["peak_memory_gib"] else ""
            first = f", first step {r['first_step_s']:.0f} s" if mode == "compiled" else ""
            ok = "" if r["loss_finite"] else ", LOSS NOT FINITE"
            trend = "falling" if r["loss_falling"] else "not falling"
            fb = ", fell back to eager" if r["compile_fallback"] else ""
            return (
                f"{r['steps_per_s']:.2f} steps/s, {r['slices_per_s']:.0f} slices/s{mem}{first}; "
                f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} ({trend}){ok}{fb}"
            )

        add(f"training, {mode}, {amp_name(amp, tf32)} (batch {report['batch']})", train_cell)
    recon = {
        r["preset"]: r for r in report["reconstruct"] if "skipped" not in r and "failed" not in r
    }
    for amp in ("none", "bf16"):

        def rec_cell(p: str, amp: str = amp) -> str:
            r = recon.get(p, {}).get(amp)
            if r is None:
                return "n/a"
            return (
                f"{r['seconds_per_volume']:.2f} s/volume, {r['pairs_per_s']:.0f} pairs/s, "
                f"{r['tflops']:.3g} TFLOP/s ({100 * r['share_of_peak']:.0f} % of peak)"
            )

        add(f"reconstruct, one {report['volume']} volume, {amp_name(amp, tf32)}", rec_cell)
    add(
        "channels_last against contiguous (reconstruct, fastest autocast)",
        lambda p: (
            f"{recon[p]['channels_last']['speedup']:.2f}x"
            if p in recon and "channels_last" in recon[p]
            else "n/a"
        ),
    )

    def agreement_cell(p: str, key: str) -> str:
        a = recon.get(p, {}).get(key)
        if a is None:
            return "n/a"
        return f"mean {a['mean']:.2e}, 99.9th pct {a['p999']:.2e}, max {a['max']:.2e}"

    tol = BF16_MAP_TOLERANCE
    add(
        f"maps in the brain, bf16 vs true fp32 (tolerance: mean {tol['mean']:g}, "
        f"99.9th pct {tol['p999']:g})",
        lambda p: agreement_cell(p, "bf16_vs_fp32"),
    )
    if tf32:
        add("maps in the brain, tf32 vs true fp32", lambda p: agreement_cell(p, "tf32_vs_fp32"))
    hours = report["table1_gpu_hours"]
    add(
        "Table 1 GPU-hours (5 folds: train + evaluate)",
        lambda p: next(
            (
                f"{h['train_h']:.1f} + {h['evaluate_h']:.1f} = {h['total_h']:.1f} h "
                f"({h['training']}; reconstruct {h['reconstruct']})"
                for m, h in hours.items()
                if m in MODELS and preset_name(m, report["scale"]) == p
            ),
            "n/a",
        ),
    )
    ddp = report.get("ddp")
    add(
        "DDP (torchrun)",
        lambda p: (
            f"{ddp['world']} ranks ({ddp['backend']}): {ddp['steps_per_s']:.2f} steps/s, "
            f"{ddp['global_slices_per_s']:.0f} slices/s in all"
            if ddp and ddp["preset"] == p
            else "n/a"
        ),
    )
    lines.append("")
    lines.append(
        f"Both models together: {hours['total']:.1f} GPU-hours; run {report['seconds']:.0f} s."
    )
    for f in report.get("failures", []):
        lines.append(f"FAILED: {f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:1 or cpu")
    ap.add_argument("--scale", choices=["paper", "cpu", "tiny"], default="paper")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    ap.add_argument(
        "--slices", type=int, help="slices of the volume to reconstruct (default: all 50)"
    )
    ap.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="compiled training rows (auto: on CUDA; on the CPU compilation takes minutes)",
    )
    ap.add_argument("--max-minutes", type=float, default=5.0, help="time budget of the run")
    ap.add_argument(
        "--first-row-minutes",
        type=float,
        default=2.0,
        help="budget of the first row, MAEDiff's (compiled) training, run before the others "
        "in a child process: stopped there, it fails the run",
    )
    ap.add_argument(
        "--compile-reserve",
        type=float,
        default=75.0,
        help="seconds a compiled row needs: it is skipped when less of the budget is left",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = Deadline(args.max_minutes)
    ddp = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ddp, main_rank = ddp_row(args.device, preset_name("maediff", args.scale), 5, args.seed)
        if not main_rank:
            return 0
    dev = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    amps = ["none", "bf16"] if bf16_native(dev) else ["none"]
    compiled = args.compile == "on" or (args.compile == "auto" and dev.type == "cuda")
    peak_dtype = "bf16" if "bf16" in amps else "fp32"
    peak = matmul_peak(dev, torch.bfloat16 if peak_dtype == "bf16" else torch.float32)
    training: list[dict[str, Any]] = []
    recon: list[dict[str, Any]] = []
    presets = [preset_name(m, args.scale) for m in MODELS]
    # first, with its own budget: MAEDiff's training as the paper scale runs it
    # (compiled on CUDA, bf16 where native), in a child process; a crash, an
    # out-of-memory error or its budget running out fails the run
    training.append(
        bounded_train_row(
            60 * args.first_row_minutes,
            preset=presets[0],
            dev=dev,
            amp=amps[-1],
            compiled=compiled,
            steps=args.steps,
            warmup=args.warmup,
            seed=args.seed,
        )  # fmt: skip
    )
    done = {(presets[0], "compiled" if compiled else "eager", amps[-1])}
    for preset in presets:  # every further row starts only while the budget lasts
        for amp in amps:
            if (preset, "eager", amp) in done:
                continue
            if deadline.left() <= 0:
                training.append({"preset": preset, "mode": "eager", "amp": amp, "skipped": "time"})
                continue
            training.append(train_row(preset, dev, amp, False, args.steps, args.warmup, args.seed))
            release(dev, False)
    for preset in presets:
        if deadline.left() <= 0:
            recon.append({"preset": preset, "skipped": "time"})
            continue
        recon.append(reconstruct_row(preset, dev, args.slices, amps, peak, args.seed))
        release(dev, False)
    for preset in presets[1:] if compiled else []:
        if deadline.left() < args.compile_reserve:
            training.append(
                {"preset": preset, "mode": "compiled", "amp": amps[-1], "skipped": "time"}
            )
            continue
        kwargs = dict(preset=preset, dev=dev, amp=amps[-1], compiled=True, steps=args.steps)
        kwargs.update(warmup=args.warmup, seed=args.seed)
        training.append(bounded_train_row(deadline.left(), **kwargs))
    cfg = get_preset(presets[0])
    X, Y, Z = cfg.data.volume_shape
    report = {
        "environment": environment(dev),
        "peak": {"dtype": peak_dtype, "tflops": peak},
        "scale": args.scale,
        "batch": cfg.train.batch_size,
        "compiled_amp": amps[-1],
        "volume": f"{X}x{Y}x{Z}",
        "training": training,
        "reconstruct": recon,
        "ddp": ddp,
        "table1_gpu_hours": table1_hours(
            training, recon, args.scale, bool(environment(dev).get("tf32"))
        ),
        "seconds": time.perf_counter() - t0,
    }
    for r in training:
        r["precision"] = amp_name(r["amp"], report["environment"]["tf32"])
    report["failures"] = failures(report)
    return finish_report(report, markdown(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
